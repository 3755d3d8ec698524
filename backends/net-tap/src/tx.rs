//! The TX path: guest frames written to the tap straight from guest memory (one writev per
//! frame, the virtio-net header passed through for the tap's checksum/GSO handling).

use std::io;
use std::os::fd::RawFd;

use hype_daemon::guest_error;
use hype_daemon::vring::{Drain, Handled};

use crate::backend::{Mem, VringState};
use crate::chain::{collect, HostSeg};
use crate::stats::Stats;
use crate::VNET_HDR_LEN;

/// Largest chain we pass to the tap: a 64 KiB GSO frame, its headers and the vnet header.
pub(crate) const MAX_TX_FRAME: usize = VNET_HDR_LEN + 65536 + 256;

/// Chains returned between two used-ring signals while a guest keeps the ring busy.
const SIGNAL_BATCH: usize = 64;

/// Per-queue scratch space.
#[derive(Default)]
pub(crate) struct TxScratch {
    segs: Vec<HostSeg>,
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs only hold addresses while `process` runs, with the memory guard held;
// between calls the vector is empty of meaning (it is cleared before every use).
unsafe impl Send for TxScratch {}

/// Sends every available TX chain to the tap queue `fd`.
pub(crate) fn process(
    st: &mut VringState,
    mem: &Mem,
    fd: RawFd,
    event_idx: bool,
    hdr_len: usize,
    stats: &Stats,
    scratch: &mut TxScratch,
) {
    if !st.is_enabled() {
        return;
    }
    Drain::new("tx", event_idx)
        .suppress_without_event_idx()
        .signal_every(SIGNAL_BATCH)
        .run(st, mem, |chain| {
            let head = chain.head_index();
            send_chain(chain, mem, fd, hdr_len, stats, scratch, head);
            Handled::Used(0)
        });
}

fn send_chain<M>(
    chain: virtio_queue::DescriptorChain<M>,
    mem: &Mem,
    fd: RawFd,
    hdr_len: usize,
    stats: &Stats,
    scratch: &mut TxScratch,
    head: u16,
) where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let total = match collect(chain, mem, false, MAX_TX_FRAME, &mut scratch.segs) {
        Ok(t) if t >= hdr_len => t,
        Ok(t) => {
            Stats::add(&stats.tx_malformed, 1);
            guest_error(format_args!(
                "tx: dropping chain {head}: {t} bytes, shorter than the header"
            ));
            return;
        }
        Err(e) => {
            Stats::add(&stats.tx_malformed, 1);
            guest_error(format_args!("tx: dropping chain {head}: {e}"));
            return;
        }
    };
    scratch.iov.clear();
    scratch.iov.extend(scratch.segs.iter().map(|s| libc::iovec {
        iov_base: s.addr as *mut libc::c_void,
        iov_len: s.len,
    }));
    loop {
        // SAFETY: every iovec maps guest memory held by `mem` for the duration of the call;
        // the count is at most MAX_SEGMENTS (1024), within UIO_MAXIOV.
        let n = unsafe { libc::writev(fd, scratch.iov.as_ptr(), scratch.iov.len() as libc::c_int) };
        if n >= 0 {
            Stats::add(&stats.tx_packets, 1);
            Stats::add(&stats.tx_bytes, (total - hdr_len) as u64);
            return;
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        Stats::add(&stats.tx_errors, 1);
        guest_error(format_args!("tx: tap refused a {total}-byte frame: {err}"));
        return;
    }
}
