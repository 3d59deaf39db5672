#!/usr/bin/env python3
"""Prints the functions longer than N lines (default 70) in the given source folders (default:
the four crates): `tools/dev/fn-lengths.py 100 | sort -rn`. Counts braces
from each `fn` to its end; stops reading a file at its `#[cfg(test)]` module (tests may be long)."""
import re,sys,os
N=int(sys.argv[1]) if len(sys.argv) > 1 else 70; paths=sys.argv[2:] or ["target/src", "writeback/src", "logfmt/src", "tools/src"]
fnre=re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)')
for root in paths:
  for dp,_,fs in os.walk(root):
    if '/tests' in dp or 'fuzz' in dp: continue
    for f in fs:
      if not f.endswith('.rs'): continue
      p=os.path.join(dp,f); L=open(p).read().split('\n')
      i=0
      intest=None
      while i<len(L):
        if re.match(r'\s*#\[cfg\(test\)\]',L[i]): break
        m=fnre.match(L[i])
        if m:
          depth=0; started=False; j=i
          while j<len(L):
            s=re.sub(r'"(\\.|[^"\\])*"','',L[j]); s=re.sub(r"'(\\.|[^'\\])'",'',s); s=s.split('//')[0]
            depth+=s.count('{')-s.count('}')
            if '{' in s: started=True
            if started and depth<=0: break
            if not started and s.rstrip().endswith(';'): break
            j+=1
          n=j-i+1
          if n>N: print(f"{n:4d} {p}:{i+1} {m.group(6)}")
        i+=1
