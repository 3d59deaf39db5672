//! A device wrapper that calls a hook before every write, zeroing and flush, so that a test can
//! stop the world at an exact point: the k-th backing write of writeback, the backing flush
//! that ends a batch, the checkpoint write, … (a timer lands there only by luck).

use std::io;
use std::sync::Arc;

use wb_target::Device;

/// An operation about to reach the device.
#[derive(Debug)]
pub enum IoOp<'a> {
    Write { offset: u64, data: &'a [u8] },
    Zero { offset: u64, len: u64 },
    Flush,
}

/// Called before each operation with the wrapped device. `None` lets the operation through;
/// `Some(result)` means the hook handled it (e.g. tore it) and the device does nothing more.
pub type Hook = dyn Fn(&dyn Device, &IoOp<'_>) -> Option<io::Result<()>> + Send + Sync;

pub struct Hooked {
    inner: Arc<dyn Device>,
    hook: Box<Hook>,
}

impl Hooked {
    pub fn new(
        inner: Arc<dyn Device>,
        hook: impl Fn(&dyn Device, &IoOp<'_>) -> Option<io::Result<()>> + Send + Sync + 'static,
    ) -> Arc<Hooked> {
        Arc::new(Hooked {
            inner,
            hook: Box::new(hook),
        })
    }
}

impl Device for Hooked {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let op = IoOp::Write { offset, data: buf };
        (self.hook)(self.inner.as_ref(), &op).unwrap_or_else(|| self.inner.write_at(buf, offset))
    }
    fn flush(&self) -> io::Result<()> {
        (self.hook)(self.inner.as_ref(), &IoOp::Flush).unwrap_or_else(|| self.inner.flush())
    }
    fn zero_range(&self, offset: u64, len: u64, discard: bool) -> io::Result<()> {
        let op = IoOp::Zero { offset, len };
        (self.hook)(self.inner.as_ref(), &op)
            .unwrap_or_else(|| self.inner.zero_range(offset, len, discard))
    }
}
