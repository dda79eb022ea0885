//! The broker's private parsers, reachable from the fuzz targets in `fuzz/` (a crate outside
//! the workspace). Hidden from the documentation and called by nothing in the platform: the
//! targets drive the same functions a session does, rather than copies of them.

pub use crate::mqtt::{read_stream, ReadFrame, StreamReading};
pub use crate::registry::{read_leaf, LeafFacts};
