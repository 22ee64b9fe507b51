//! The flagwrite service (being written).
