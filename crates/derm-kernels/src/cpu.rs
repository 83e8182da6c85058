//! What derm-kernels' candle custom ops share on the CPU: the data of a storage as a slice, and a
//! dispatch over the two float dtypes the kernels are written for.

use candle_core::{CpuStorage, Layout, WithDType};

/// The contiguous data of a CPU storage as a slice of `T`; `name` (the op) heads the error for
/// a strided operand or another dtype.
pub(crate) fn data<'a, T: WithDType>(name: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{name}: operand must be contiguous")))?;
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// Evaluates `$body` with the type alias `$t` set to `f32` or `f64` after the dtype of the CPU
/// storage `$s`; any other dtype returns an error naming `$name` from the enclosing function.
macro_rules! float_dispatch {
    ($name:expr, $s:expr, |$t:ident| $body:expr) => {
        match $s {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!(
                "{}: f32 or f64 only, got {:?}",
                $name,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}
pub(crate) use float_dispatch;

/// `v` as f32 values when `T` is f32.
pub(crate) fn as_f32<T: WithDType>(v: &[T]) -> Option<&[f32]> {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: T is f32, so the slice is a slice of f32.
        Some(unsafe { std::slice::from_raw_parts(v.as_ptr() as *const f32, v.len()) })
    } else {
        None
    }
}

/// `v` as mutable f32 values when `T` is f32.
pub(crate) fn as_f32_mut<T: WithDType>(v: &mut [T]) -> Option<&mut [f32]> {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: T is f32, so the slice is a slice of f32, borrowed mutably once.
        Some(unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut f32, v.len()) })
    } else {
        None
    }
}
