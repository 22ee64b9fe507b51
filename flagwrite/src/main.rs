//! The flagwrite binary (being written).

fn main() {}
