//! The control queue: `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`; every other command is refused.

use hype_daemon::guest_error;
use hype_daemon::vring::{Drain, Handled};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::DescriptorChain;

use crate::backend::{Mem, VringState};
use crate::chain::{HostSeg, MAX_SEGMENTS};
use crate::stats::Stats;

/// Longest command (class, command, data) we read; the ones we accept are 4 bytes.
const MAX_COMMAND: usize = 64;

/// Answers every available control command. `set_pairs(n)` applies VQ_PAIRS_SET and says
/// whether `n` was accepted.
pub(crate) fn process(
    st: &mut VringState,
    mem: &Mem,
    event_idx: bool,
    stats: &Stats,
    mut set_pairs: impl FnMut(u16) -> bool,
) {
    if !st.is_enabled() {
        return;
    }
    Drain::new("ctrl", event_idx)
        .suppress_without_event_idx()
        .run(st, mem, |chain| answer(chain, mem, stats, &mut set_pairs));
}

/// Reads one command chain, applies it and writes its one-byte ack.
fn answer(
    chain: DescriptorChain<Mem>,
    mem: &Mem,
    stats: &Stats,
    set_pairs: &mut impl FnMut(u16) -> bool,
) -> Handled {
    let head = chain.head_index();
    let mut cmd = [0u8; MAX_COMMAND];
    let mut cmd_len = 0usize;
    let mut ack: Option<HostSeg> = None;
    let mut ok = true;
    for (i, desc) in chain.enumerate() {
        if i >= MAX_SEGMENTS {
            ok = false;
            break;
        }
        let len = desc.len() as usize;
        if !desc.is_write_only() {
            if ack.is_some() {
                ok = false; // readable after writable
                break;
            }
            let room = MAX_COMMAND - cmd_len;
            if len > room {
                ok = false;
                break;
            }
            if vm_memory::Bytes::read_slice(&**mem, &mut cmd[cmd_len..cmd_len + len], desc.addr())
                .is_err()
            {
                ok = false;
                break;
            }
            cmd_len += len;
        } else if ack.is_none() && len >= 1 {
            match vm_memory::GuestMemoryBackend::get_slice(&**mem, desc.addr(), 1) {
                Ok(s) => {
                    ack = Some(HostSeg {
                        addr: s.ptr_guard().as_ptr() as usize,
                        len: 1,
                    })
                }
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
    }
    let Some(ack) = ack.filter(|_| ok) else {
        Stats::add(&stats.ctrl_errors, 1);
        guest_error(format_args!("ctrl: dropping malformed chain {head}"));
        return Handled::Used(0);
    };
    let status = match &cmd[..cmd_len] {
        [class, command, lo, hi]
            if u32::from(*class) == VIRTIO_NET_CTRL_MQ
                && u32::from(*command) == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET =>
        {
            if set_pairs(u16::from_le_bytes([*lo, *hi])) {
                VIRTIO_NET_OK
            } else {
                VIRTIO_NET_ERR
            }
        }
        _ => VIRTIO_NET_ERR,
    } as u8;
    if status != VIRTIO_NET_OK as u8 {
        Stats::add(&stats.ctrl_errors, 1);
        guest_error(format_args!(
            "ctrl: refused command {:?}",
            &cmd[..cmd_len.min(2)]
        ));
    }
    crate::chain::copy_to_segments(&[ack], &[status]);
    Handled::Used(1)
}
