//! The EROFS filesystem image: on-disk structures, a writer and a reader.

pub mod ondisk;
pub mod reader;
pub mod writer;

pub use reader::{DirEntry, Erofs, Inode, ReadError};
pub use writer::{ImageOptions, WriteError, WrittenImage, write_image};
