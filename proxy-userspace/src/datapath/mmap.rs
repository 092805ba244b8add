//! Array maps created with `BPF_F_MMAPABLE`, mapped into the agent: a Maglev ring of
//! 65,537 entries is one memory copy instead of 65,537 syscalls, and counters shared
//! with the data path can be changed with the same atomic instructions it uses.
//!
//! Only the pages an access needs are mapped, and only for that access: the kernel
//! maps an array's pages whole and at once, so a standing mapping of the scheduler
//! tables would count their 32 MB in the agent's resident memory for good.

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
    map: MapData,
    len: usize,
    /// The kernel stores array elements 8-byte aligned: a u32 takes 8 bytes.
    stride: usize,
    _values: PhantomData<T>,
}

const PAGE: usize = 4096;

/// Some pages of an array, mapped until dropped.
struct Window {
    base: NonNull<u8>,
    bytes: usize,
    /// Where the first element asked for lies in the window.
    skip: usize,
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `MappedArray::window` mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

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
        let array = MappedArray {
            len: info.max_entries() as usize,
            stride: std::mem::size_of::<T>().next_multiple_of(8),
            map,
            _values: PhantomData,
        };
        // Fails now, not at the first sync, if the map was not created mmapable.
        drop(
            array
                .window(0, 1)
                .with_context(|| format!("mmap of map {name}"))?,
        );
        Ok(array)
    }

    /// How many entries the map has.
    pub fn entries(&self) -> usize {
        self.len
    }

    /// Maps the pages holding entries `first..first + count`, checked to exist.
    fn window(&self, first: usize, count: usize) -> Result<Window> {
        if first.checked_add(count).is_none_or(|end| end > self.len) {
            bail!(
                "entries {first}..{} are outside the map ({} entries)",
                first + count,
                self.len
            );
        }
        let start = first * self.stride / PAGE * PAGE;
        let end = ((first + count) * self.stride).next_multiple_of(PAGE);
        let bytes = (end - start).max(PAGE);
        // SAFETY: mapping pages of a BPF array map fd (created mmapable) read-write,
        // shared, inside the map (checked above).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.map.fd().as_fd().as_raw_fd(),
                start as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of an array map");
        }
        Ok(Window {
            base: NonNull::new(base.cast()).context("mmap returned null")?,
            bytes,
            skip: first * self.stride - start,
        })
    }

    /// The `index`th element of a window.
    fn element(&self, window: &Window, index: usize) -> *mut T {
        // SAFETY: `window` covers the elements asked for, `index` counts from the
        // first of them.
        unsafe {
            window
                .base
                .as_ptr()
                .add(window.skip + index * self.stride)
                .cast()
        }
    }

    pub fn write(&mut self, offset: usize, values: &[T]) -> Result<()> {
        let window = self.window(offset, values.len())?;
        for (i, value) in values.iter().enumerate() {
            // SAFETY: inside the window; the data path only reads extents not in use.
            unsafe { self.element(&window, i).write(*value) };
        }
        Ok(())
    }

    pub fn read(&self, offset: usize, count: usize) -> Result<Vec<T>> {
        let window = self.window(offset, count)?;
        // SAFETY: inside the window.
        Ok((0..count)
            .map(|i| unsafe { self.element(&window, i).read() })
            .collect())
    }
}

impl MappedArray<ConnCounts> {
    /// Applies `update` to a backend's (active, inactive) counters, atomically as the
    /// data path changes them.
    fn update_counters(&self, backend: u32, update: impl Fn(&AtomicU64, bool)) {
        let Ok(window) = self.window(backend as usize, 1) else {
            return;
        };
        let counts = self.element(&window, 0);
        for inactive in [false, true] {
            // SAFETY: inside the window; the fields are naturally aligned u64s that
            // the data path also updates atomically.
            let counter = unsafe {
                AtomicU64::from_ptr(if inactive {
                    &raw mut (*counts).inactive
                } else {
                    &raw mut (*counts).active
                })
            };
            update(counter, inactive);
        }
    }

    /// Adds to a backend's counters, never below zero (as the data path's decrement).
    pub fn adjust(&self, backend: u32, active: i64, inactive: i64) {
        self.update_counters(backend, |counter, is_inactive| {
            let delta = if is_inactive { inactive } else { active };
            let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add_signed(delta))
            });
        });
    }

    /// Zeroes a backend id's counters before the id is handed to a new backend.
    pub fn reset(&self, backend: u32) {
        self.update_counters(backend, |counter, _| counter.store(0, Ordering::SeqCst));
    }
}
