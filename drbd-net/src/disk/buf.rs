//! [`AlignedBuf`]: a heap buffer whose start is aligned for `O_DIRECT`.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`], in bytes.
///
/// `O_DIRECT` needs the memory address (and the file offset and length) aligned to the
/// logical block size of the device, which is 512 or 4096 bytes on every device Linux
/// supports today; the page size covers both.
pub const BUF_ALIGN: usize = 4096;

/// A zero-initialised heap buffer of `len` bytes starting on a [`BUF_ALIGN`] boundary.
///
/// The allocation is rounded up to a whole number of [`BUF_ALIGN`] blocks (at least one, so
/// an empty buffer still has a valid aligned address); only the first `len` bytes are visible
/// through the safe API. The data never moves while the buffer lives: moving an `AlignedBuf`
/// moves only its pointer, which is what lets a disk engine hand the address to the kernel
/// and keep the buffer in a table until the kernel is done with it.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: an `AlignedBuf` uniquely owns its allocation, like a `Vec<u8>`; nothing in it is
// tied to the thread that allocated it.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]` to the data; mutation needs `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    ///
    /// # Panics
    /// If `len` rounded up to [`BUF_ALIGN`] overflows `isize` (no such allocation can exist);
    /// aborts like `Vec` does if the allocator is out of memory.
    pub fn zeroed(len: usize) -> Self {
        let size = len
            .max(1)
            .checked_next_multiple_of(BUF_ALIGN)
            .expect("AlignedBuf length overflows usize");
        let layout = Layout::from_size_align(size, BUF_ALIGN).expect("AlignedBuf too large");
        assert!(layout.size() > 0, "layout size is at least one block");
        // SAFETY: `layout` has a non-zero size (checked just above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        assert_eq!(
            ptr.as_ptr() as usize % BUF_ALIGN,
            0,
            "allocator broke alignment"
        );
        Self { ptr, len, layout }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    /// Number of visible bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no visible bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes actually allocated: `len` rounded up to a whole number of [`BUF_ALIGN`] blocks.
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// The data.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size() >= len` initialised (zeroed at allocation)
        // bytes owned by `self`, and `&self` rules out a concurrent `&mut` to them.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The data, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Makes the buffer hold a copy of `data`, reusing its allocation.
    ///
    /// # Panics
    /// If `data` is longer than [`capacity`](Self::capacity) (a caller bug: pools hand out
    /// buffers of a large enough class).
    pub fn refill(&mut self, data: &[u8]) {
        assert!(
            data.len() <= self.capacity(),
            "refill of {} bytes into a buffer of {}",
            data.len(),
            self.capacity()
        );
        // The bytes past the old `len` are initialised too (zeroed at allocation).
        self.len = data.len();
        self.as_mut_slice().copy_from_slice(data);
    }

    /// Address of the first byte, for handing to the kernel (no reference is created).
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable address of the first byte, for handing to the kernel (no reference is
    /// created, so the kernel may write through it while the buffer sits in a table).
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed(self.layout)` and is freed only here,
        // once. The engines never drop a buffer while the kernel may still access it: they
        // keep it in their in-flight table until its completion has arrived.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self.as_slice())
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for AlignedBuf {}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_is_aligned_and_zero() {
        for len in [0, 1, 511, 512, 4095, 4096, 4097, 65536 + 3] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.is_empty(), len == 0);
            assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
            assert!(buf.capacity() >= len.max(1));
            assert_eq!(buf.capacity() % BUF_ALIGN, 0);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn from_slice_copies_and_mutates() {
        let mut buf = AlignedBuf::from_slice(b"hello");
        assert_eq!(buf.as_slice(), b"hello");
        buf.as_mut_slice()[0] = b'j';
        assert_eq!(&buf[..], b"jello");
        let copy = buf.clone();
        assert_eq!(copy, buf);
        assert_ne!(copy.as_ptr(), buf.as_ptr());
        assert_eq!(format!("{buf:?}"), "AlignedBuf { len: 5, capacity: 4096 }");
    }

    #[test]
    fn moving_keeps_the_address() {
        let buf = AlignedBuf::zeroed(8192);
        let addr = buf.as_ptr();
        let moved = Box::new(buf);
        assert_eq!(moved.as_ptr(), addr);
    }
}

/// Smallest buffer class of a [`BufPool`].
const POOL_MIN_CLASS: usize = BUF_ALIGN;
/// Largest buffer class of a [`BufPool`]: DRBD's largest request.
const POOL_MAX_CLASS: usize = 1 << 20;
/// Number of classes (4 KiB, 8 KiB, ..., 1 MiB).
const POOL_CLASSES: usize = (POOL_MAX_CLASS / POOL_MIN_CLASS).trailing_zeros() as usize + 1;

/// Write buffers kept for reuse, in power-of-two classes from 4 KiB to 1 MiB, at most
/// `limit` bytes in all.
///
/// Every replicated write is copied once into an aligned buffer for the disk engine. Taking
/// that buffer from the pool instead of the allocator saves zeroing it, and keeps the
/// allocator from accumulating freed megabyte blocks across threads: without it a daemon
/// under a 1 MiB write stream held hundreds of MiB it no longer used.
#[derive(Debug)]
pub struct BufPool {
    classes: [Vec<AlignedBuf>; POOL_CLASSES],
    held: usize,
    limit: usize,
}

impl BufPool {
    /// An empty pool that keeps at most `limit` bytes.
    pub fn new(limit: usize) -> BufPool {
        BufPool {
            classes: Default::default(),
            held: 0,
            limit,
        }
    }

    fn class_of(len: usize) -> Option<usize> {
        let size = len.max(POOL_MIN_CLASS).checked_next_power_of_two()?;
        (size <= POOL_MAX_CLASS).then(|| (size / POOL_MIN_CLASS).trailing_zeros() as usize)
    }

    /// A buffer holding a copy of `data`: a kept one of its class if there is one.
    pub fn copy_of(&mut self, data: &[u8]) -> AlignedBuf {
        let Some(class) = Self::class_of(data.len()) else {
            return AlignedBuf::from_slice(data);
        };
        match self.classes[class].pop() {
            Some(mut buf) => {
                self.held -= buf.capacity();
                buf.refill(data);
                buf
            }
            None => {
                let mut buf = AlignedBuf::zeroed(POOL_MIN_CLASS << class);
                buf.refill(data);
                buf
            }
        }
    }

    /// Takes `buf` back for reuse, or frees it when the pool is full or it fits no class.
    pub fn give(&mut self, buf: AlignedBuf) {
        let cap = buf.capacity();
        let Some(class) = Self::class_of(cap).filter(|&c| POOL_MIN_CLASS << c == cap) else {
            return;
        };
        if self.held + cap <= self.limit {
            self.held += cap;
            self.classes[class].push(buf);
        }
    }

    /// Bytes kept.
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_class_within_the_limit() {
        let mut pool = BufPool::new(2 << 20);
        let a = pool.copy_of(&[1u8; 5000]);
        assert_eq!(a.len(), 5000);
        assert_eq!(a.capacity(), 8192);
        assert!(a.iter().all(|&b| b == 1));
        let addr = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.held(), 8192);
        // Same class: the same allocation, holding the new data only.
        let b = pool.copy_of(&[2u8; 4097]);
        assert_eq!(b.as_ptr(), addr);
        assert_eq!(b.len(), 4097);
        assert!(b.iter().all(|&x| x == 2));
        assert_eq!(pool.held(), 0);
        // The limit holds: two 1 MiB buffers fit, a third is freed.
        for _ in 0..3 {
            let big = pool.copy_of(&vec![3u8; 1 << 20]);
            pool.give(big);
            let again = [pool.copy_of(&[4u8; 1 << 20]), pool.copy_of(&[5u8; 1 << 20])];
            let third = pool.copy_of(&[6u8; 1 << 20]);
            for buf in again {
                pool.give(buf);
            }
            pool.give(third);
            assert!(pool.held() <= 2 << 20);
        }
        // Larger than the largest class: a plain buffer, not kept.
        let huge = pool.copy_of(&vec![7u8; (1 << 20) + 512]);
        assert_eq!(huge.len(), (1 << 20) + 512);
        let held = pool.held();
        pool.give(huge);
        assert_eq!(pool.held(), held);
        // A buffer not of a class size (from elsewhere) is not kept either.
        pool.give(AlignedBuf::zeroed(12288));
        assert_eq!(pool.held(), held);
    }
}
