//! The target crate's dependencies point one way (README "How it is built"):
//!
//! ```text
//! daemon → ublk → open → engine → {log, map} → {control, panics} → device, private_file, error
//! (and the crate root's `hex` and `CRITICAL_LOG_TARGET`)
//! ```
//!
//! Every `crate::X` path in `target/src` (tests modules aside: a test may build anything) is
//! checked against this order: a module may name itself or a lower layer, never a higher one
//! and never a sibling of its own layer (`log` and `map` do not know each other). Run alone with
//! `cargo test -p wb-tests --test layers`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Layer of each top-level module of `target/src`; higher numbers may use lower ones.
const LAYERS: &[(&str, u32)] = &[
    ("daemon", 6),
    ("ublk", 5),
    ("open", 4),
    ("engine", 3),
    ("log", 2),
    ("map", 2),
    ("control", 1),
    ("panics", 1),
    ("device", 0),
    ("private_file", 0),
    ("error", 0),
    ("hex", 0),
    ("CRITICAL_LOG_TARGET", 0),
    ("lib", 7),
];

fn layer(module: &str) -> u32 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .unwrap_or_else(|| panic!("module `{module}` has no layer in tests/tests/layers.rs"))
        .1
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `target/src` belongs to (`engine/mode.rs` → `engine`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_str()
        .unwrap();
    first.trim_end_matches(".rs").to_string()
}

/// Every `crate::X` named in the non-test part of `text`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    let mut found = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap();
        for (i, _) in line.match_indices("crate::") {
            let name: String = line[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    assert!(files.len() > 10, "no sources found under {}", src.display());
    let mut bad = Vec::new();
    for file in &files {
        let from = module_of(src, file);
        for to in crate_paths(&std::fs::read_to_string(file).unwrap()) {
            let upward_or_sideways = to != from && layer(&to) >= layer(&from);
            if upward_or_sideways {
                bad.push(format!(
                    "{} (layer {from}) names crate::{to}",
                    file.display()
                ));
            }
        }
    }
    bad
}

#[test]
fn target_dependencies_point_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/src");
    let bad = violations(&src);
    assert!(
        bad.is_empty(),
        "imports against the layer order:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_check_sees_an_upward_import() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("log")).unwrap();
    for (i, name) in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
        .iter()
        .enumerate()
    {
        std::fs::write(src.join(format!("log/{name}.rs")), format!("// {i}\n")).unwrap();
    }
    std::fs::write(
        src.join("log/writer.rs"),
        "use crate::engine::Shared;\n#[cfg(test)]\nmod tests {\n use crate::daemon::x;\n}\n",
    )
    .unwrap();
    let bad = violations(src);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].contains("names crate::engine"), "{bad:?}");
}
