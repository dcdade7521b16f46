//! Compression of payloads: zstd, one frame per payload, its content size in the
//! frame header.
//!
//! zstd rather than lz4: PostgreSQL already compresses values of more than about
//! 2 KB itself (TOAST, pglz or lz4), so a second fast-but-light compressor would
//! gain little over it, while zstd's better ratio also shrinks what crosses the
//! network and the WAL, and is what makes sealed values, which PostgreSQL cannot
//! compress, small again (docs/benchmarks.md has the ratios and the cost).

use std::cell::RefCell;

use zstd::bulk::{Compressor, Decompressor};

/// The zstd level: 3 is zstd's default, fast to compress and far faster to read.
const LEVEL: i32 = 3;

/// The largest payload a frame may claim to hold: PostgreSQL's largest field.
/// Bounds what a tampered frame can make a reader allocate.
const MAX_CONTENT: u64 = 1 << 30;

thread_local! {
    /// Each thread's zstd contexts, kept between calls: making one allocates and
    /// initialises more than compressing a few kilobytes costs.
    static CONTEXTS: RefCell<Option<(Compressor<'static>, Decompressor<'static>)>> =
        const { RefCell::new(None) };
}

/// Runs `work` with this thread's contexts; `None` if they cannot be made.
fn with_contexts<T>(
    work: impl FnOnce(&mut Compressor<'static>, &mut Decompressor<'static>) -> Option<T>,
) -> Option<T> {
    CONTEXTS.with(|contexts| {
        let mut contexts = contexts.try_borrow_mut().ok()?;
        if contexts.is_none() {
            *contexts = Some((Compressor::new(LEVEL).ok()?, Decompressor::new().ok()?));
        }
        let (compressor, decompressor) = contexts.as_mut()?;
        work(compressor, decompressor)
    })
}

/// `payload` compressed, when that makes it smaller; `None` otherwise (random or
/// already compressed bytes), and the payload is stored as it is.
pub(super) fn compress(payload: &[u8]) -> Option<Vec<u8>> {
    let packed = with_contexts(|compressor, _| compressor.compress(payload).ok())?;
    (packed.len() < payload.len()).then_some(packed)
}

/// The payload of a frame [`compress`] made; `None` for one that is not well
/// formed or claims more than [`MAX_CONTENT`].
pub(super) fn decompress(frame: &[u8]) -> Option<Vec<u8>> {
    let size = zstd::zstd_safe::get_frame_content_size(frame).ok()??;
    if size > MAX_CONTENT {
        return None;
    }
    let capacity = usize::try_from(size).ok()?;
    let payload = with_contexts(|_, decompressor| decompressor.decompress(frame, capacity).ok())?;
    (payload.len() as u64 == size).then_some(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_shrinks_and_comes_back() {
        let text = "the quick brown fox jumps over the lazy dog; ".repeat(100);
        let packed = compress(text.as_bytes()).expect("repetitive text shrinks");
        assert!(packed.len() < text.len() / 4);
        assert_eq!(decompress(&packed).as_deref(), Some(text.as_bytes()));
    }

    #[test]
    fn what_does_not_shrink_is_left_alone() {
        // A chain of SHA-256 digests: no redundancy for zstd to find.
        use sha2::{Digest, Sha256};
        let mut noise = Vec::new();
        let mut block = Sha256::digest(b"seed");
        while noise.len() < 4096 {
            noise.extend_from_slice(&block);
            block = Sha256::digest(block);
        }
        assert_eq!(compress(&noise), None);
    }

    #[test]
    fn a_malformed_frame_is_refused() {
        assert_eq!(decompress(b"not a zstd frame"), None);
        let mut packed = compress("abc".repeat(500).as_bytes()).unwrap();
        packed.truncate(packed.len() - 3);
        assert_eq!(decompress(&packed), None);
    }
}
