//! The virtio-mmio register file under random access sequences: every guest read and write,
//! any offset, size and value, in any order. It must never panic, and what it reports must stay
//! within the device's model.
#![no_main]

use hype_vmm::virtio::mmio::{DeviceModel, MmioTransport};
use libfuzzer_sys::fuzz_target;

/// VERSION_1, BLK_F_FLUSH, BLK_F_SIZE_MAX.
const OFFERED: u64 = (1 << 32) | (1 << 9) | (1 << 1);

fuzz_target!(|data: &[u8]| {
    let model = DeviceModel {
        device_id: 2,
        features: OFFERED,
        num_queues: 2,
        queue_max: 256,
        config: vec![0x11; 60],
        writable_config: Vec::new(),
        vring_interrupt_always: true,
    };
    let mut t = MmioTransport::new(model);
    // Each operation: 1 byte kind/size, 2 bytes offset, 4 bytes value.
    for op in data.chunks_exact(7) {
        let size = [1usize, 2, 4, 8][usize::from(op[0] & 3)];
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) & 0x1ff;
        let value = u64::from(u32::from_le_bytes([op[3], op[4], op[5], op[6]]));
        if op[0] & 0x80 == 0 {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..size]);
        } else {
            let bytes = value.to_le_bytes();
            let _ = t.write(offset, &bytes[..size]);
        }
        // The driver may write any QueueNum; the register file checks them when the driver
        // sets DRIVER_OK, so an activated device has only queues the model allows.
        if t.is_activated() {
            for q in 0..2 {
                if let Some(c) = t.queue(q).filter(|c| c.ready) {
                    assert!(
                        c.size.is_power_of_two() && c.size <= 256,
                        "activated with a queue beyond the model: {c:?}"
                    );
                }
            }
        }
        // Once FEATURES_OK is accepted, the driver's features are a subset of the offer.
        if t.status() & 8 != 0 {
            assert_eq!(
                t.driver_features() & !OFFERED,
                0,
                "FEATURES_OK with unoffered bits"
            );
        }
    }
});
