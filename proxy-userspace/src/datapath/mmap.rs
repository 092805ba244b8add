//! Array maps created with `BPF_F_MMAPABLE`, mapped into the agent: a Maglev ring of
//! 65,537 entries is one memory copy instead of 65,537 syscalls, and counters shared
//! with the data path can be changed with the same atomic instructions it uses.

use std::{
    marker::PhantomData,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::MapData;
use proxy_common::ConnCounts;

pub struct MappedArray<T> {
    _map: MapData,
    base: NonNull<u8>,
    len: usize,
    /// The kernel stores array elements 8-byte aligned: a u32 takes 8 bytes.
    stride: usize,
    bytes: usize,
    _values: PhantomData<T>,
}

// SAFETY: the mapping is plain shared memory, shared with the kernel anyway; writes
// need &mut self, and the &self accessors are reads and atomic updates.
unsafe impl<T: Send> Send for MappedArray<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for MappedArray<T> {}

impl<T: Copy> MappedArray<T> {
    pub fn open(dir: &Path, name: &str) -> Result<MappedArray<T>> {
        let path = dir.join(name);
        let map =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let info = map.info().context("map info")?;
        if info.value_size() as usize != std::mem::size_of::<T>() {
            bail!(
                "map {name} holds {}-byte values, expected {}",
                info.value_size(),
                std::mem::size_of::<T>()
            );
        }
        let len = info.max_entries() as usize;
        let stride = std::mem::size_of::<T>().next_multiple_of(8);
        let page = 4096;
        let bytes = (len * stride).div_ceil(page) * page;
        // SAFETY: mapping a BPF array map fd (created mmapable) read-write, shared.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmap of map {name}"));
        }
        Ok(MappedArray {
            _map: map,
            base: NonNull::new(base.cast()).context("mmap returned null")?,
            len,
            stride,
            bytes,
            _values: PhantomData,
        })
    }

    /// How many entries the map has.
    pub fn entries(&self) -> usize {
        self.len
    }

    fn check(&self, offset: usize, count: usize) -> Result<()> {
        if offset.checked_add(count).is_none_or(|end| end > self.len) {
            bail!(
                "entries {offset}..{} are outside the map ({} entries)",
                offset + count,
                self.len
            );
        }
        Ok(())
    }

    fn element(&self, index: usize) -> *mut T {
        // SAFETY: callers check `index < len`; the element lies inside the mapping.
        unsafe { self.base.as_ptr().add(index * self.stride).cast() }
    }

    pub fn write(&mut self, offset: usize, values: &[T]) -> Result<()> {
        self.check(offset, values.len())?;
        for (i, value) in values.iter().enumerate() {
            // SAFETY: in bounds (checked); the data path only reads extents not in use.
            unsafe { self.element(offset + i).write(*value) };
        }
        Ok(())
    }

    pub fn read(&self, offset: usize, count: usize) -> Result<Vec<T>> {
        self.check(offset, count)?;
        // SAFETY: in bounds (checked).
        Ok((offset..offset + count)
            .map(|i| unsafe { self.element(i).read() })
            .collect())
    }
}

impl MappedArray<ConnCounts> {
    fn counter(&self, index: u32, inactive: bool) -> Option<&AtomicU64> {
        if index as usize >= self.len {
            return None;
        }
        // SAFETY: in bounds; the fields are naturally aligned u64s that the data path
        // also updates atomically.
        unsafe {
            let counts = self.element(index as usize);
            let field = if inactive {
                &raw mut (*counts).inactive
            } else {
                &raw mut (*counts).active
            };
            Some(AtomicU64::from_ptr(field))
        }
    }

    /// Adds to a backend's counters, never below zero (as the data path's decrement).
    pub fn adjust(&self, backend: u32, active: i64, inactive: i64) {
        for (is_inactive, delta) in [(false, active), (true, inactive)] {
            if let Some(counter) = self.counter(backend, is_inactive) {
                let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    Some(n.saturating_add_signed(delta))
                });
            }
        }
    }

    /// Zeroes a backend id's counters before the id is handed to a new backend.
    pub fn reset(&self, backend: u32) {
        for inactive in [false, true] {
            if let Some(counter) = self.counter(backend, inactive) {
                counter.store(0, Ordering::SeqCst);
            }
        }
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what open() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
