//! The flagread binary (being written).

fn main() {}
