//! The `pgcache` command.

fn main() {}
