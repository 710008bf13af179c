//! [`FileDevice`]: an export backed by a regular file or a block device node.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustix::fs::FallocateFlags;
use rustix::io::Errno;

use super::device::{check_range, BlockDevice, BlockError, BoxFuture};

/// Largest buffer of zeroes written at once when the file system cannot zero a range by
/// itself (`fallocate` unsupported): bounds the memory a write-zeroes request costs.
const ZERO_CHUNK: usize = 1 << 20;

/// A file (or block device node) served with positioned I/O on tokio's blocking threads.
///
/// Reads and writes are `pread`/`pwrite`; flush and FUA are `fdatasync`; trim punches a
/// hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`, ignored where unsupported) and write-zeroes
/// uses a hole or `ZERO_RANGE` where the file system supports them, else writes zeroes.
/// Completed writes sit in the shared page cache, so any number of connections may use one
/// file at once ([`BlockDevice::can_multi_conn`]).
#[derive(Debug, Clone)]
pub struct FileDevice {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl FileDevice {
    /// Open `path` for reading and writing. The size is the file's size now.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path.as_ref())?;
        Self::with_file(file, path.as_ref(), false)
    }

    /// Open `path` read-only; writes fail with [`BlockError::ReadOnly`].
    pub fn open_read_only(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = File::open(path.as_ref())?;
        Self::with_file(file, path.as_ref(), true)
    }

    fn with_file(file: File, path: &Path, read_only: bool) -> io::Result<Self> {
        // Seeking to the end also measures block devices, whose metadata says 0 bytes.
        let size = (&file).seek(SeekFrom::End(0))?;
        Ok(Self {
            file: Arc::new(file),
            path: path.to_owned(),
            size,
            read_only,
        })
    }

    /// The path the device was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `op` on a blocking thread with the file and the bounds already checked.
    fn blocking<T, F>(
        &self,
        range: (u64, u64),
        writes: bool,
        op: F,
    ) -> BoxFuture<'static, Result<T, BlockError>>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> Result<T, BlockError> + Send + 'static,
    {
        let file = self.file.clone();
        let checked = if writes && self.read_only {
            Err(BlockError::ReadOnly)
        } else {
            check_range(range.0, range.1, self.size)
        };
        Box::pin(async move {
            checked?;
            match tokio::task::spawn_blocking(move || op(&file)).await {
                Ok(result) => result,
                // The runtime is going away and dropped the task before it ran.
                Err(e) if e.is_cancelled() => Err(BlockError::Shutdown),
                Err(e) => Err(BlockError::Io(io::Error::other(e))),
            }
        })
    }
}

/// Whether `fallocate` failed only because this file system does not do that mode.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(e),
        Some(Errno::OPNOTSUPP | Errno::NOSYS)
    )
}

fn fallocate(file: &File, flags: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
    rustix::fs::fallocate(file, flags, offset, len).map_err(io::Error::from)
}

fn zero_range(file: &File, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
    if may_trim {
        match fallocate(
            file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    match fallocate(
        file,
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => return Ok(()),
        Err(e) if unsupported(&e) => {}
        Err(e) => return Err(e),
    }
    let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        self.blocking((offset, u64::from(len)), false, move |file| {
            let mut buf = BytesMut::zeroed(len as usize);
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf.freeze())
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        self.blocking((offset, data.len() as u64), true, move |file| {
            file.write_all_at(&data, offset)?;
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        self.blocking((0, 0), false, |file| Ok(file.sync_data()?))
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        self.blocking((offset, u64::from(len)), true, move |file| {
            if len == 0 {
                return Ok(());
            }
            match fallocate(
                file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                u64::from(len),
            ) {
                Ok(()) => {}
                // Trim is a hint: doing nothing is a correct implementation.
                Err(e) if unsupported(&e) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        self.blocking((offset, u64::from(len)), true, move |file| {
            if len == 0 {
                return Ok(());
            }
            zero_range(file, offset, u64::from(len), may_trim)?;
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
    }
}
