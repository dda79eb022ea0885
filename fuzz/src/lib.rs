//! What every fuzz target shares: a bound on any single allocation.
//!
//! libFuzzer's own `-malloc_limit_mb` needs a sanitizer's allocator hooks; the targets run
//! without a sanitizer (our code holds no `unsafe`, and the sanitizer costs two to three times
//! the executions), so the bound is kept here instead, in the global allocator: a request for
//! more than [`MAX_ALLOCATION`] bytes aborts, which libFuzzer reports as a crash and keeps the
//! input. A parser that allocates by a length it read, not by the bytes it got, fails here.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;

/// The largest single allocation a target may make: 64 MiB, far above what an input of
/// `-max_len` bytes (8 KiB) needs.
pub const MAX_ALLOCATION: usize = 64 << 20;

/// The system allocator, aborting on any request above [`MAX_ALLOCATION`].
pub struct Bounded;

impl Bounded {
    #[cold]
    fn refuse(size: usize) -> ! {
        // No formatting machinery that could allocate: fixed text, then the size in digits.
        let mut digits = [0u8; 20];
        let mut n = size;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(b"==fuzz== allocation of ");
        let _ = err.write_all(&digits[i..]);
        let _ = err.write_all(b" bytes exceeds the 64 MiB bound\n");
        std::process::abort();
    }
}

// SAFETY: every call is passed on to `System` unchanged, or aborts before allocating.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            Self::refuse(layout.size());
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            Self::refuse(layout.size());
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            Self::refuse(new_size);
        }
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

/// Installs [`Bounded`] as the target's global allocator.
#[macro_export]
macro_rules! bounded_allocations {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::Bounded = $crate::Bounded;
    };
}
