//! The sandbox of `hype block-file`: the system calls serving an image file or block device
//! needs, and the files it keeps (none by path: the image is open before it is confined).

use hype_daemon::sandbox::{
    Cond, Group, Policy, Rule, CLONE3_REFUSED, OPEN_REFUSED, RUNTIME, VHOST_USER,
};

/// `BLKDISCARD`, an ioctl left after setup (DISCARD on a block device).
const BLKDISCARD: u64 = 0x1277;
/// `BLKGETSIZE64`, the other one (a block device's size, read again on GET_CONFIG so a grown
/// device shows up on a resize).
const BLKGETSIZE64: u64 = 0x8008_1272;

/// Guest requests on the open image: reads and writes (buffered and `O_DIRECT` vectors),
/// FLUSH, DISCARD and WRITE_ZEROES.
pub static FILE_IO: Group = Group {
    name: "block-file",
    why: "guest requests: pread/pwrite (preadv/pwritev with --direct), fdatasync for FLUSH, \
          fallocate for DISCARD/WRITE_ZEROES, BLKDISCARD on block devices, BLKGETSIZE64 for \
          the size on GET_CONFIG",
    rules: &[
        Rule::always("pread64", libc::SYS_pread64),
        Rule::always("pwrite64", libc::SYS_pwrite64),
        Rule::always("preadv", libc::SYS_preadv),
        Rule::always("pwritev", libc::SYS_pwritev),
        Rule::always("fdatasync", libc::SYS_fdatasync),
        Rule::always("fallocate", libc::SYS_fallocate),
        Rule::when(
            "ioctl",
            libc::SYS_ioctl,
            &[&[Cond::eq(1, BLKDISCARD)], &[Cond::eq(1, BLKGETSIZE64)]],
        ),
    ],
};

/// Everything `hype block-file` may call once serving.
pub static POLICY: Policy = Policy {
    name: "block-file",
    groups: &[&RUNTIME, &VHOST_USER, &FILE_IO],
    refusals: &[CLONE3_REFUSED, OPEN_REFUSED],
};
