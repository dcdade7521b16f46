//! [`Packing`]: the codec bound to one entry's payload, so a table compresses,
//! seals and opens its payload without building the codec's context itself.

use std::fmt;

use super::TypedTable;
use crate::codec::{Codec, Context};
use crate::error::Result;

/// The codec bound to one entry's payload: the entry's cache, the table's name for
/// its payload ([`TypedTable::PAYLOAD`]) and the entry's digest, all bound into a
/// seal, so a sealed payload cannot pass for another entry's or another table's.
#[derive(Clone, Copy)]
pub struct Packing<'a> {
    codec: &'a Codec,
    context: Context<'a>,
}

impl fmt::Debug for Packing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Packing")
            .field("cache", &self.context.cache)
            .field("part", &self.context.part)
            .finish_non_exhaustive()
    }
}

impl<'a> Packing<'a> {
    /// The payload of the entry of table `T` stored under `digest`.
    pub(super) fn new<T: TypedTable>(codec: &'a Codec, digest: &'a [u8]) -> Self {
        Packing {
            codec,
            context: Context::new(T::CACHE, T::PAYLOAD, digest),
        }
    }

    /// Whether payloads are sealed (encryption keys are configured).
    pub(crate) fn seals(&self) -> bool {
        self.codec.seals()
    }

    /// The payload as stored: an envelope (compressed over the threshold, sealed
    /// when there are keys), or `None` when it is stored as it is.
    ///
    /// # Errors
    /// As [`Codec::pack`].
    pub(crate) fn pack(&self, payload: &[u8]) -> Result<Option<Vec<u8>>> {
        self.codec.pack(payload, self.context)
    }

    /// The payload's envelope when payloads are sealed, `None` (stored as it is)
    /// otherwise: never compressed alone.
    ///
    /// # Errors
    /// As [`Codec::pack`].
    pub(crate) fn seal(&self, payload: &[u8]) -> Result<Option<Vec<u8>>> {
        self.codec.seal(payload, self.context)
    }

    /// The payload of an envelope made for this entry; `None`, with a warning, when
    /// it cannot be vouched for (the read is a miss).
    pub(crate) fn open(&self, envelope: &[u8]) -> Option<Vec<u8>> {
        self.codec.open(envelope, self.context)
    }
}
