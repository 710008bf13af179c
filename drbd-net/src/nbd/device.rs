//! The backend an export serves: [`BlockDevice`], its errors, and an in-memory device.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use bytes::Bytes;
use rustix::io::Errno;

use super::proto::ErrorCode;

/// A boxed, sendable future: what the [`BlockDevice`] methods return, so that the trait
/// stays object-safe (`Arc<dyn BlockDevice>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a backend operation failed. Each maps to one NBD error value
/// ([`BlockError::error_code`]).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The operating system reported an error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The device refuses writes (a Secondary, or a read-only file).
    #[error("device is read-only")]
    ReadOnly,
    /// The range does not lie inside the device.
    #[error("range beyond the end of the device")]
    OutOfRange,
    /// No space left to allocate the written blocks.
    #[error("no space left on the device")]
    NoSpace,
    /// The device is going away.
    #[error("device is shutting down")]
    Shutdown,
}

impl BlockError {
    /// The NBD error value a client sees for this error.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            BlockError::Io(e) => match Errno::from_io_error(e) {
                // The protocol asks for EDQUOT and EFBIG to be reported as ENOSPC.
                Some(Errno::NOSPC | Errno::DQUOT | Errno::FBIG) => ErrorCode::NoSpc,
                Some(Errno::ROFS | Errno::PERM | Errno::ACCESS) => ErrorCode::Perm,
                Some(Errno::INVAL) => ErrorCode::Inval,
                _ => ErrorCode::Io,
            },
            BlockError::ReadOnly => ErrorCode::Perm,
            BlockError::OutOfRange => ErrorCode::Inval,
            BlockError::NoSpace => ErrorCode::NoSpc,
            BlockError::Shutdown => ErrorCode::Shutdown,
        }
    }
}

/// A block device an NBD export serves.
///
/// Completion semantics are the backend's: the server sends a write's reply only after
/// [`write`](Self::write) returned, so whatever "done" means for the backend (written to
/// the page cache, replicated to the peer, on stable storage) is what the client sees.
/// Requests run concurrently; overlapping writes in flight at the same time may complete in
/// any order, as on any block device.
///
/// Implementations must check ranges themselves (the server checks them too, against the
/// size announced at connect time) and must never panic on any argument.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes. Read when a client connects.
    fn size(&self) -> u64;

    /// Whether writes, trims and write-zeroes fail with [`BlockError::ReadOnly`]. Read when a
    /// client connects (to announce `NBD_FLAG_READ_ONLY`); a device that becomes read-only
    /// later reports it per request by failing with [`BlockError::ReadOnly`].
    fn read_only(&self) -> bool;

    /// Whether several connections may share this device safely
    /// (`NBD_FLAG_CAN_MULTI_CONN`): a write acknowledged to any connection must be visible
    /// to reads from every connection, and a flush (or FUA) through any connection must make
    /// every write acknowledged before it durable. Defaults to `false`.
    fn can_multi_conn(&self) -> bool {
        false
    }

    /// A client selected this device and holds it open until [`closed`](Self::closed)
    /// (a replicated device stays Primary while held open, as a block device does).
    fn opened(&self) {}

    /// A client that [`opened`](Self::opened) the device disconnected.
    fn closed(&self) {}

    /// Read `len` bytes at `offset`; the result must be exactly `len` bytes long.
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>>;

    /// Write `data` at `offset`; with `fua`, return only once the data is durable.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>>;

    /// Make every write that completed before this call durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>>;

    /// The range is no longer needed; its contents become unspecified. May do nothing.
    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), BlockError>>;

    /// Make the range read back as zeroes; `may_trim` allows deallocating it.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), BlockError>>;
}

/// Check that `offset..offset + len` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange),
    }
}

/// A device held in memory, for tests. Multi-connection safe; can be switched read-only at
/// any time (like a Primary becoming Secondary).
#[derive(Debug, Default)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    read_only: AtomicBool,
    flushes: AtomicU64,
}

impl MemDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_vec(vec![0; size])
    }

    /// A device with these contents.
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(data),
            read_only: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
        }
    }

    /// Refuse (or accept again) writes, trims and write-zeroes.
    pub fn set_read_only(&self, read_only: bool) {
        self.read_only.store(read_only, Ordering::SeqCst);
    }

    /// A copy of the contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many flushes (including FUA writes) were made.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn fill(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        with: Option<&[u8]>,
    ) -> Result<(), BlockError> {
        if self.read_only() {
            return Err(BlockError::ReadOnly);
        }
        let mut data = self.data.write().unwrap_or_else(PoisonError::into_inner);
        check_range(offset, len, data.len() as u64)?;
        // Both fit in usize: they are bounded by the length of the vector.
        let (start, end) = (offset as usize, (offset + len) as usize);
        match with {
            Some(bytes) => data[start..end].copy_from_slice(bytes),
            None => data[start..end].fill(0),
        }
        if fua {
            self.flushes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        Box::pin(async move {
            let data = self.data.read().unwrap_or_else(PoisonError::into_inner);
            check_range(offset, u64::from(len), data.len() as u64)?;
            let start = offset as usize;
            Ok(Bytes::copy_from_slice(&data[start..start + len as usize]))
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move { self.fill(offset, data.len() as u64, fua, Some(&data)) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        // Trimmed blocks read back as zeroes here, which is one allowed outcome.
        Box::pin(async move { self.fill(offset, u64::from(len), fua, None) })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move { self.fill(offset, u64::from(len), fua, None) })
    }
}
