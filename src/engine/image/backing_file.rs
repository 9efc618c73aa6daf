//! Changing the backing file an image names (`qemu-img rebase`, the end of a commit or stream
//! block job): the header cluster is rewritten with the new name and backing format
//! extension.

use crate::engine::error::{Error, Result};
use crate::engine::format::header::{ext, Header, RawExtension};
use crate::engine::image::Image;
use crate::engine::storage::Storage;

/// The longest backing file name QEMU accepts (and writes).
const MAX_BACKING_FILE_NAME_BYTES: usize = 1023;

impl<S: Storage> Image<S> {
    /// Names `file` (in format `format`) as the backing file, or none.
    ///
    /// Order: everything written before is written back and made durable first (a rebase
    /// copies data into this image before it drops the old backing file: the new name must
    /// not reach the disk before that data); then the header cluster is rewritten in one
    /// write and synced.
    pub fn change_backing_file(
        &mut self,
        file: Option<&[u8]>,
        format: Option<&[u8]>,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if format.is_some() && file.is_none() {
            return Err(Error::Invalid(
                "a backing format without a backing file".into(),
            ));
        }
        if let Some(name) = file.filter(|n| n.len() > MAX_BACKING_FILE_NAME_BYTES) {
            return Err(Error::Invalid(format!(
                "backing file name of {} bytes (at most {MAX_BACKING_FILE_NAME_BYTES})",
                name.len()
            )));
        }
        let renamed = |current: &Header| {
            let mut header = current.clone();
            header.backing_file = file.map(<[u8]>::to_vec);
            header.backing_format = format.map(<[u8]>::to_vec);
            header.extensions.retain(|e| e.kind != ext::BACKING_FORMAT);
            if let Some(format) = format {
                // First, where QEMU puts it.
                header.extensions.insert(
                    0,
                    RawExtension {
                        kind: ext::BACKING_FORMAT,
                        data: format.to_vec(),
                    },
                );
            }
            header
        };
        // Refused before anything is written if the new header does not fit.
        renamed(&self.header).encode()?;

        self.flush_metadata_and_sync(true)?;
        // From the header as the flush left it: in the txg mode the flush commits the open
        // group, which moves the L1 and refcount tables, and a header encoded before it
        // would name the old ones again and drop the group.
        let bytes = renamed(&self.header).encode()?;
        // What the header says now, as a reader of the file would parse it.
        let header = Header::parse(&bytes)?;
        self.write_metadata(0, &bytes, "rewriting the header with the new backing file")?;
        self.storage_flush()?;
        self.header = header;
        Ok(())
    }
}
