//! One module per cache table. Each holds the table's storage code (functions on a
//! `&mut PgConnection` returning `QueryResult`) and the public handle that implements
//! [`Cache`](crate::Cache) on top of it.

mod kv;

pub use kv::KvCache;
