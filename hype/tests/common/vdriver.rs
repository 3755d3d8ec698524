//! A guest virtio driver played by the test: registers through a `VhostUserDevice`, split
//! rings built with hype-testkit in testkit guest RAM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hype_testkit::blk::{submit_request, BlkRequest, BlkResponse};
use hype_testkit::memory::GuestRam;
use hype_testkit::virtqueue::Virtqueue;
use hype_vmm::virtio::device::{DeviceEvents, DeviceOptions};
use hype_vmm::virtio::mmio::{reg, status};
use hype_vmm::virtio::VhostUserDevice;
use vmm_sys_util::eventfd::EventFd;

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
pub const RUNNING: u32 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

/// The guest side: registers through the device, rings in testkit RAM.
pub struct Guest {
    pub ram: Arc<GuestRam>,
    pub queues: Vec<Virtqueue>,
}

pub fn r(d: &VhostUserDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.mmio_read(off, &mut b);
    u32::from_le_bytes(b)
}

pub fn w(d: &VhostUserDevice, off: u64, v: u32) {
    d.mmio_write(off, &v.to_le_bytes());
}

impl Guest {
    pub fn new(num_queues: u16, size: u16) -> Guest {
        let ram = Arc::new(GuestRam::new(32 << 20).unwrap());
        let queues = (0..num_queues)
            .map(|i| Virtqueue::new(ram.clone(), i, size).unwrap())
            .collect();
        Guest { ram, queues }
    }

    /// Eventfds shared with the testkit queues: a kick written by the testkit queue is what
    /// an ioeventfd would deliver; a call is what the irqfd would take.
    pub fn events(&self) -> DeviceEvents {
        DeviceEvents {
            kicks: self
                .queues
                .iter()
                .map(|q| q.kick_fd().try_clone().unwrap())
                .collect(),
            calls: self
                .queues
                .iter()
                .map(|q| q.call_fd().try_clone().unwrap())
                .collect(),
            config: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    pub fn attach(&self, opts: &DeviceOptions) -> VhostUserDevice {
        VhostUserDevice::attach(
            "test0",
            opts,
            self.ram.memory().clone(),
            Some(self.events()),
        )
        .unwrap()
    }

    /// The driver initialisation sequence of virtio 1.2 3.1.1, acking `features`.
    pub fn init(&self, d: &VhostUserDevice, features: u64) {
        assert_eq!(r(d, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(d, reg::VERSION), 2);
        w(d, reg::STATUS, 0);
        w(d, reg::STATUS, status::ACKNOWLEDGE);
        w(d, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(d, reg::DEVICE_FEATURES_SEL, 1);
        let hi = r(d, reg::DEVICE_FEATURES);
        w(d, reg::DEVICE_FEATURES_SEL, 0);
        let lo = r(d, reg::DEVICE_FEATURES);
        let offered = u64::from(hi) << 32 | u64::from(lo);
        assert_eq!(offered & features, features, "offered {offered:#x}");
        assert_eq!(
            offered & (1 << 30),
            0,
            "vhost-user bit 30 leaked to the guest"
        );
        w(d, reg::DRIVER_FEATURES_SEL, 0);
        w(d, reg::DRIVER_FEATURES, features as u32);
        w(d, reg::DRIVER_FEATURES_SEL, 1);
        w(d, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w(
            d,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(r(d, reg::STATUS) & status::FEATURES_OK, 0);
        for q in &self.queues {
            w(d, reg::QUEUE_SEL, u32::from(q.index()));
            assert!(r(d, reg::QUEUE_NUM_MAX) >= u32::from(q.size()));
            assert_eq!(r(d, reg::QUEUE_READY), 0);
            let rings = q.rings();
            w(d, reg::QUEUE_NUM, u32::from(q.size()));
            for (lo, hi, addr) in [
                (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, rings.desc),
                (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, rings.avail),
                (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, rings.used),
            ] {
                w(d, lo, addr as u32);
                w(d, hi, (addr >> 32) as u32);
            }
            w(d, reg::QUEUE_READY, 1);
        }
        w(d, reg::STATUS, RUNNING);
        assert_eq!(r(d, reg::STATUS), RUNNING);
    }

    pub fn execute(&mut self, q: usize, req: &BlkRequest) -> BlkResponse {
        let vq = &mut self.queues[q];
        let head = submit_request(vq, req).unwrap();
        let c = vq.wait_for(head, IO_TIMEOUT).unwrap();
        BlkResponse::from_completion(c)
    }

    pub fn write(&mut self, q: usize, sector: u64, data: Vec<u8>) {
        let req = BlkRequest::write(sector, data);
        self.execute(q, &req).check(&req).unwrap();
    }

    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> Vec<u8> {
        let req = BlkRequest::read(sector, len);
        let resp = self.execute(q, &req);
        resp.check(&req).unwrap();
        resp.data
    }
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub fn capacity(d: &VhostUserDevice) -> u64 {
    let mut b = [0u8; 8];
    d.mmio_read(reg::CONFIG, &mut b);
    u64::from_le_bytes(b)
}

pub fn poll_for(vq: &mut Virtqueue, head: u16) -> hype_testkit::virtqueue::Completion {
    let t = Instant::now();
    loop {
        if let Some(c) = vq.poll().unwrap().into_iter().find(|c| c.head == head) {
            return c;
        }
        assert!(t.elapsed() < IO_TIMEOUT, "request {head} not completed");
        std::thread::sleep(Duration::from_millis(5));
    }
}
