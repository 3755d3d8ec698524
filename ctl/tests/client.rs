//! The `hype ctl` client against a real API server with a fake VM: answers, error statuses
//! with the server's reason, and a socket nobody serves.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hype_api::model::*;
use hype_api::ApiServer;
use hype_ctl::client::{Client, ClientError};
use hype_ctl::ctl::{execute, CtlArgs, Verb};

struct Fake(Mutex<VmState>);

impl VmApi for Fake {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: *self.0.lock().unwrap(),
            uptime_ms: 1500,
            config: VmConfigInfo {
                kernel: None,
                initrd: None,
                cmdline: None,
                memory_bytes: 64 << 20,
                cpus: 1,
                serial: "none".into(),
                emulation_fixups: false,
            },
            vcpus: vec![],
            memory: MemoryInfo {
                bytes: 64 << 20,
                regions: vec![MemoryRegion {
                    guest_address: 0,
                    bytes: 64 << 20,
                }],
            },
            devices: vec![],
            counters: Counters {
                mmio_unclaimed: 0,
                fixups: Default::default(),
                fixups_unhandled: 0,
                interrupts: Default::default(),
            },
        }
    }
    fn pause(&self) -> Result<ActionReply, ControlError> {
        let mut s = self.0.lock().unwrap();
        if *s == VmState::Paused {
            return Err(ControlError::AlreadyPaused);
        }
        *s = VmState::Paused;
        Ok(ActionReply::state(*s))
    }
    fn resume(&self) -> Result<ActionReply, ControlError> {
        Err(ControlError::NotPaused)
    }
    fn shutdown(&self, _: Duration) -> Result<ActionReply, ControlError> {
        Err(ControlError::ShuttingDown)
    }
    fn stop(&self) -> Result<ActionReply, ControlError> {
        Ok(ActionReply::state(VmState::Stopping))
    }
    fn add_device(&self, _: &AddDeviceRequest) -> Result<DeviceInfo, ControlError> {
        Err(ControlError::Unavailable("no".into()))
    }
    fn remove_device(&self, id: &str) -> Result<(), ControlError> {
        Err(ControlError::NoSuchDevice(id.into()))
    }
    fn refresh_device_config(&self, id: &str) -> Result<ConfigRefreshReply, ControlError> {
        Ok(ConfigRefreshReply {
            id: id.into(),
            changed: id == "virtio0",
            config: "capacity 4096 sectors".into(),
        })
    }
    fn switch_backend(
        &self,
        _: &str,
        req: &SwitchBackendRequest,
    ) -> Result<DeviceInfo, ControlError> {
        Err(ControlError::Conflict(format!(
            "no backend listens on {}",
            req.socket
        )))
    }
}

fn socket(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ctl-client");
    std::fs::create_dir_all(&d).unwrap();
    d.join(format!("{name}.sock"))
}

#[test]
fn client_and_ctl_against_a_server() {
    let path = socket("server");
    let _server = ApiServer::start(&path, Arc::new(Fake(Mutex::new(VmState::Running)))).unwrap();
    let c = Client::new(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(c.info().unwrap().uptime_ms, 1500);
    let args = |verb, json| CtlArgs {
        api_socket: path.clone(),
        json,
        verb,
    };
    assert_eq!(execute(&args(Verb::Pause, false)).unwrap(), "paused\n");
    let e = execute(&args(Verb::Pause, false)).unwrap_err();
    match &e {
        hype_ctl::ctl::CtlError::Call {
            verb: "pause",
            source:
                ClientError::Status {
                    status: 409,
                    message,
                },
        } => assert_eq!(message, "the VM is already paused"),
        other => panic!("{other:?}"),
    }
    let out = execute(&args(Verb::Info, false)).unwrap();
    assert!(out.starts_with("state: paused, up 1.5 s\n"), "{out}");
    assert!(
        out.contains("memory: 64 MiB in 1 region(s): 0x0+64 MiB\n"),
        "{out}"
    );
    let json = execute(&args(Verb::Info, true)).unwrap();
    let v: VmInfo = serde_json::from_str(&json).unwrap();
    assert_eq!(v.state, VmState::Paused);
    assert_eq!(
        execute(&args(Verb::Stop, true)).unwrap(),
        "{\"state\":\"stopping\"}\n"
    );
    let resize = |id: &str| Verb::ResizeDevice { id: id.into() };
    assert_eq!(
        execute(&args(resize("virtio0"), false)).unwrap(),
        "virtio0: capacity 4096 sectors (changed; the guest was told)\n"
    );
    assert_eq!(
        execute(&args(resize("virtio1"), false)).unwrap(),
        "virtio1: capacity 4096 sectors (unchanged)\n"
    );
    let json = execute(&args(resize("virtio0"), true)).unwrap();
    let r: ConfigRefreshReply = serde_json::from_str(&json).unwrap();
    assert!(r.changed);
    let switch = Verb::SwitchBackend {
        id: "virtio0".into(),
        socket: "/x.sock".into(),
    };
    match execute(&args(switch, false)).unwrap_err() {
        hype_ctl::ctl::CtlError::Call {
            verb: "switch-backend",
            source:
                ClientError::Status {
                    status: 409,
                    message,
                },
        } => assert_eq!(message, "no backend listens on /x.sock"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn nobody_serving_is_a_request_error() {
    let c = Client::new(&socket("nobody"), Duration::from_secs(1)).unwrap();
    assert!(matches!(c.info(), Err(ClientError::Request { .. })));
}
