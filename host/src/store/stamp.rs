//! Telling a file's versions apart without reading it.

/// What tells a file's versions apart without reading it: device, inode,
/// length, and modification and change times. `ctime` cannot be set by a
/// user (`touch -d`, `cp -p`, `rsync -t` set `mtime` only), and a
/// replaced file is a new inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// This stamp if it can vouch for the bytes read after it: its times
    /// are over a second old. The kernel stamps files from a coarse clock,
    /// so two writes within one tick can leave the same times; a write
    /// after a second has passed cannot (git's "racy clean" rule).
    pub(crate) fn settled(self) -> Option<Self> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        (self.mtime.0 < now - 1 && self.ctime.0 < now - 1).then_some(self)
    }
}
