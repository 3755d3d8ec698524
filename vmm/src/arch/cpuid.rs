//! CPUID for each vCPU: what KVM supports (KVM_GET_SUPPORTED_CPUID), with the topology and APIC
//! IDs rewritten to describe `count` single-threaded cores in one package, the hypervisor bit set,
//! and KVM's paravirt leaves kept.
//!
//! Only leaves KVM reported are kept, so nothing is advertised that the host cannot do.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;
/// CPUID.1:ECX bit 31, "running under a hypervisor".
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28, HTT: the package has more than one logical processor.
pub const EDX_HTT: u32 = 1 << 28;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// CPU vendor, from leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD or HygonGenuine.
    Amd,
    /// Anything else.
    Other,
}

/// Reads the vendor from the leaf 0 entry.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(e) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&e.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&e.edx.to_le_bytes());
    id[8..].copy_from_slice(&e.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// KVM paravirt leaf with the feature bits (EAX).
pub const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_PV_UNHALT: paravirt spinlocks (a waiter halts, the holder kicks it by hypercall).
pub const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
/// KVM_FEATURE_PV_SEND_IPI: IPIs through a hypercall.
pub const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
/// KVM_FEATURE_PV_SCHED_YIELD: yield to a preempted IPI target by hypercall.
pub const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;

/// KVM paravirt features hidden from guests on PVM hosts, where an ordinary (non-PVM) guest
/// kernel runs under PVM's instruction emulator. There `vmcall` never completes: the vCPU spins
/// in the host kernel and never comes back (measured: a 2-vCPU Linux 6.1 guest with PV IPIs hangs
/// bringing up CPU 1; a tiny guest doing one `vmcall` spins for minutes). So every feature whose
/// guest side makes hypercalls goes: PV IPIs, PV sched yield (taken when an IPI target is
/// preempted, that is on a busy host) and PV unhalt (the kick of PV spinlocks). Linux then sends
/// IPIs through the local APIC and uses native spinlocks.
pub const PVM_HIDDEN_KVM_FEATURES: u32 =
    KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD;

/// Clears KVM paravirt feature bits (leaf 0x4000_0001 EAX).
pub fn hide_kvm_features(entries: &mut [kvm_cpuid_entry2], mask: u32) {
    for e in entries
        .iter_mut()
        .filter(|e| e.function == LEAF_KVM_FEATURES)
    {
        e.eax &= !mask;
    }
}

/// Rewrites the CPUID table for vCPU `index` (its APIC ID) of `count` vCPUs.
pub fn filter(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    let core_bits = id_bits(count);
    let vendor = vendor(entries);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                let logical = if count > 1 { 1u32 << core_bits } else { 1 };
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((logical.min(255)) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                let level = (e.eax >> 5) & 0x7;
                if e.eax & 0x1f != 0 {
                    let cores = (1u32 << core_bits).min(64) - 1;
                    let sharing = if level >= 3 {
                        (1u32 << core_bits) - 1
                    } else {
                        0
                    };
                    e.eax = (e.eax & 0x3fff) | (cores << 26) | ((sharing & 0xfff) << 14);
                }
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (TOPOLOGY_LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (TOPOLOGY_LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_ADDRESS_SIZES if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            LEAF_AMD_EXT_APIC_ID if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xffff) | apic_id;
                e.ecx &= !0x7ff;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn intel() -> Vec<kvm_cpuid_entry2> {
        let v = b"GenuineIntel";
        let r = |i: usize| u32::from_le_bytes(v[i..i + 4].try_into().unwrap());
        vec![
            entry(0, 0, 0x1f, r(0), r(8), r(4)),
            entry(1, 0, 0x806f8, 0x00ff_0800, 0x7ffa_3203, 0x0f8b_fbff),
            entry(4, 0, 0x121, 0, 0, 0),
            entry(4, 3, 0x163, 0, 0, 0),
            entry(0xb, 0, 9, 9, 9, 9),
            entry(0xb, 1, 9, 9, 9, 9),
            entry(0xb, 2, 9, 9, 9, 9),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        ]
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    #[test]
    fn apic_id_and_count_in_leaf_1() {
        let mut e = intel();
        filter(&mut e, 3, 4);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "brand/clflush bits kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = intel();
        filter(&mut e, 0, 1);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn topology_leaf_describes_cores() {
        let mut e = intel();
        filter(&mut e, 5, 6);
        let smt = find(&e, 0xb, 0);
        let core = find(&e, 0xb, 1);
        let end = find(&e, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 5));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (3, 6, 2, 5));
        assert_eq!((end.ebx, end.ecx >> 8, end.edx), (0, 0, 5));
    }

    #[test]
    fn cache_leaf_core_count() {
        let mut e = intel();
        filter(&mut e, 0, 4);
        assert_eq!(find(&e, 4, 0).eax >> 26, 3);
        assert_eq!((find(&e, 4, 0).eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!((find(&e, 4, 3).eax >> 14) & 0xfff, 3, "L3 is shared");
    }

    #[test]
    fn paravirt_leaf_kept() {
        let mut e = intel();
        let before = find(&e, 0x4000_0000, 0);
        filter(&mut e, 1, 2);
        assert_eq!(find(&e, 0x4000_0000, 0), before);
    }

    #[test]
    fn hides_only_the_given_kvm_features() {
        let mut e = intel();
        e.push(entry(
            LEAF_KVM_FEATURES,
            0,
            0x0100_0eff | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD,
            0,
            0,
            0,
        ));
        hide_kvm_features(&mut e, PVM_HIDDEN_KVM_FEATURES);
        let l = find(&e, LEAF_KVM_FEATURES, 0);
        assert_eq!(l.eax & KVM_FEATURE_PV_SEND_IPI, 0);
        assert_eq!(l.eax & KVM_FEATURE_PV_UNHALT, 0);
        assert_eq!(l.eax & KVM_FEATURE_PV_SCHED_YIELD, 0);
        // Everything else stays: clock sources, async PF, steal time, PV EOI, TLB flush, ...
        assert_eq!(l.eax, 0x0100_067f);
    }

    #[test]
    fn vendor_detection() {
        assert_eq!(vendor(&intel()), Vendor::Intel);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            [
                id_bits(1),
                id_bits(2),
                id_bits(3),
                id_bits(4),
                id_bits(5),
                id_bits(254)
            ],
            [0, 1, 2, 2, 3, 8]
        );
    }
}
