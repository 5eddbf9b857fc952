//! The hot elementwise loops compiled for the CPU's vector instructions.
//!
//! The build targets baseline x86-64 (SSE2), so that one binary runs on any x86-64. LLVM
//! then vectorizes a loop 4 wide at best, and some not at all: the softmax weights (the
//! exp polynomial with its exponent-bit tricks) ran one element at a time, about 5 ns per
//! logit, which cost the dense pass about 40 ms of its 0.29 s per evaluation at B = 256 on
//! Fashion-MNIST (2 Zen 4 cores). Each loop here is written once as an `#[inline(always)]`
//! function; [`multiversion!`] compiles it again inside AVX-512 and AVX2 wrappers and picks
//! one at run time (the CPU's features are detected once and cached by std).
//!
//! The versions run the same operations in the same order (Rust never fuses a * b + c into
//! an FMA on its own, and the loops' lanes are explicit), so a result is bitwise the same
//! whichever runs.

/// `$vis fn $name(args) -> ret` running `$body(args)` (an `#[inline(always)]` fn) compiled
/// for AVX-512 where the CPU has it, else AVX2 + FMA, else the baseline.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:path;) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if $crate::oracle::simd::avx512() {
                    // SAFETY: the CPU has the features v4 is compiled for (checked).
                    return unsafe { v4($($arg),*) };
                }
                if $crate::oracle::simd::avx2() {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Whether the CPU runs the AVX-512 versions.
#[cfg(target_arch = "x86_64")]
pub fn avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
}

/// Whether the CPU runs the AVX2 versions.
#[cfg(target_arch = "x86_64")]
pub fn avx2() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}
