//! The flagread service (being written).
