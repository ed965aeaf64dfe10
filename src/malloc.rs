//! The C allocator's arena limit for the server process (glibc only).
//!
//! glibc gives each new thread that allocates its own malloc arena, up to 8 per core, and
//! memory freed in one arena is not handed to another. In the server, tokio workers, blocking
//! decoders and ONNX Runtime's threads all allocate and free request-sized buffers (uploads,
//! decoded images, activations), so the resident set grows well above what is live. Limiting
//! the arenas (`M_ARENA_MAX`, what the `MALLOC_ARENA_MAX` environment variable sets) applies to
//! Rust and ONNX Runtime alike; `bench/memory` measures the effect (bench/README.md).

/// What [`limit_arenas`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArenaLimit {
    /// `mallopt(M_ARENA_MAX, n)` was applied.
    Set(u32),
    /// Asked for 0: glibc's default was left alone.
    Default,
    /// `MALLOC_ARENA_MAX` was set in the environment; glibc follows it and it wins.
    FromEnvironment(String),
    /// Not glibc: nothing to set.
    Unsupported,
}

/// Why [`limit_arenas`] failed.
#[derive(Debug, thiserror::Error)]
pub enum MallocError {
    /// glibc refused the setting.
    #[error("mallopt(M_ARENA_MAX, {0}) was refused")]
    Refused(u32),
}

/// Limits the C allocator to `max` arenas (0: leave glibc's default). Call it first thing in
/// `main`, before threads start: arenas that already exist stay.
pub fn limit_arenas(max: u32) -> Result<ArenaLimit, MallocError> {
    if max == 0 {
        return Ok(ArenaLimit::Default);
    }
    if let Ok(v) = std::env::var("MALLOC_ARENA_MAX") {
        return Ok(ArenaLimit::FromEnvironment(v));
    }
    set_arena_max(max)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(max: u32) -> Result<ArenaLimit, MallocError> {
    let value = libc::c_int::try_from(max).map_err(|_| MallocError::Refused(max))?;
    // SAFETY: mallopt only changes allocator settings; any int is a valid argument.
    match unsafe { libc::mallopt(libc::M_ARENA_MAX, value) } {
        1 => Ok(ArenaLimit::Set(max)),
        _ => Err(MallocError::Refused(max)),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_max: u32) -> Result<ArenaLimit, MallocError> {
    Ok(ArenaLimit::Unsupported)
}

/// How many malloc arenas the process has now, read from glibc's `malloc_info` report (one
/// `<heap>` element per arena); None where that is unavailable.
pub fn arena_count() -> Option<usize> {
    report().map(|xml| xml.matches("<heap nr=").count())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn report() -> Option<String> {
    let mut buf: *mut libc::c_char = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: open_memstream writes the buffer pointer and length on fclose; the buffer is
    // malloc'ed by glibc, copied out, then freed once.
    unsafe {
        let stream = libc::open_memstream(&mut buf, &mut len);
        if stream.is_null() {
            return None;
        }
        let ok = libc::malloc_info(0, stream) == 0;
        libc::fclose(stream);
        if buf.is_null() {
            return None;
        }
        let bytes = std::slice::from_raw_parts(buf as *const u8, len).to_vec();
        libc::free(buf.cast());
        ok.then(|| String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn report() -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_leaves_the_default() {
        assert_eq!(limit_arenas(0).unwrap(), ArenaLimit::Default);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn malloc_info_counts_at_least_the_main_arena() {
        assert!(arena_count().is_some_and(|n| n >= 1));
    }
}
