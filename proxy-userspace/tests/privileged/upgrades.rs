//! Upgrading over a predecessor's pinned maps: maps whose keys grew at their end
//! (the address family), and arrays that grew by slots (the node's IPv6 masquerade
//! address), are carried over, not refused, so that services keep their ids (which
//! conntrack names) and nothing is dropped.

use aya::maps::{lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, MapData};
use ebpf_proxy::datapath::loader::Datapath;
use proxy_common::{
    map_name, Addr, AddrKey, ConfigValue, Family, NodeAddrFlags, ServiceKey, ServiceValue,
    SourceRangeKey, CONFIG_LEN, CONFIG_NETNS_COOKIE, CONFIG_SNAT_ADDR6, MAX_SERVICES, PROTO_TCP,
    SCOPE_ADDRESS, SOURCE_RANGE_ENTRIES, SOURCE_RANGE_ID_BITS,
};

use crate::support::datapath::TestDatapath;

/// `BPF_F_NO_PREALLOC`: LPM tries must be created with it.
const NO_PREALLOC: u32 = 1;

const VIP: [u8; 4] = [10, 96, 7, 1];
const NODE: [u8; 4] = [198, 18, 7, 1];
const RANGE: [u8; 4] = [203, 0, 113, 0];
const SERVICE_ID: u32 = 7;

/// The first bytes of `value`'s memory.
fn bytes<T: Copy, const N: usize>(value: &T) -> [u8; N] {
    assert!(N <= size_of::<T>());
    let mut out = [0u8; N];
    // SAFETY: reads N bytes of a plain repr(C) value at least that long.
    out.copy_from_slice(unsafe { std::slice::from_raw_parts((&raw const *value).cast(), N) });
    out
}

/// Replaces the pin of `name` with a map the caller made in the old layout.
fn repin(dp: &TestDatapath, name: &str, pin: impl FnOnce(&std::path::Path)) {
    let path = dp.pin_dir.join(name);
    std::fs::remove_file(&path).expect("unpin the current map");
    pin(&path);
}

#[test]
fn maps_whose_keys_or_slots_grew_are_carried_over_from_a_predecessor() {
    let dp = TestDatapath::new();
    let service_key = ServiceKey {
        addr: Addr::from_v4_octets(VIP),
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        scope: SCOPE_ADDRESS,
        ..ServiceKey::default()
    };
    let service = ServiceValue {
        id: SERVICE_ID,
        ..ServiceValue::default()
    };
    let node = Addr::from_v4_octets(NODE);
    let range = SourceRangeKey {
        service_id_be: SERVICE_ID.to_be(),
        addr: Addr::from_v4_octets(RANGE),
    };
    // The predecessor's layout: a 20-byte service key, 16-byte address keys (an
    // address alone) and 8-byte source-range data (id and an IPv4 address), each
    // the first bytes of today's key.
    repin(&dp, map_name::SERVICES, |path| {
        let mut old = HashMap::<MapData, [u8; 20], ServiceValue>::create(MAX_SERVICES, 0)
            .expect("old SERVICES");
        old.insert(bytes::<_, 20>(&service_key), service, 0)
            .expect("insert");
        old.pin(path).expect("pin");
    });
    for name in [map_name::NODE_ADDRS, map_name::SERVICE_ADDRS] {
        let entries = if name == map_name::NODE_ADDRS {
            64
        } else {
            MAX_SERVICES
        };
        repin(&dp, name, |path| {
            let mut old = HashMap::<MapData, [u8; 16], NodeAddrFlags>::create(entries, 0)
                .expect("old address set");
            old.insert(bytes::<_, 16>(&node), NodeAddrFlags { flags: 0 }, 0)
                .expect("insert");
            old.pin(path).expect("pin");
        });
    }
    repin(&dp, map_name::SOURCE_RANGES, |path| {
        let mut old = LpmTrie::<MapData, [u8; 8], u8>::create(SOURCE_RANGE_ENTRIES, NO_PREALLOC)
            .expect("old SOURCE_RANGES");
        let key = LpmKey::new(SOURCE_RANGE_ID_BITS + 24, bytes::<_, 8>(&range));
        old.insert(&key, 1, 0).expect("insert");
        old.pin(path).expect("pin");
    });

    // NODE_CONFIG before its IPv6 masquerade slot: four slots, the socket hooks'
    // network namespace among them (which serves the node until the agent learns it
    // again).
    let cookie = ConfigValue::from_u64(0x5eed);
    repin(&dp, map_name::NODE_CONFIG, |path| {
        let mut old = Array::<MapData, ConfigValue>::create(CONFIG_LEN - 1, 0).expect("old");
        old.set(CONFIG_NETNS_COOKIE, cookie, 0).expect("set");
        old.pin(path).expect("pin");
    });

    // The new version starts on them: nothing refused, every entry kept, as IPv4.
    let reloaded = Datapath::load(&dp.pin_dir);
    assert!(reloaded.is_ok(), "{:#}", reloaded.err().expect("error"));
    let tables = dp.tables();
    assert_eq!(
        tables.services.get(&service_key, 0).expect("service kept"),
        service
    );
    assert_eq!(service_key.family, Family::V4.number());
    let node_key = AddrKey::new(node, Family::V4.number());
    assert!(tables.node_addrs.get(&node_key, 0).is_ok());
    assert!(tables.service_addrs.get(&node_key, 0).is_ok());
    let probe = LpmKey::new(
        SOURCE_RANGE_ID_BITS + 32,
        SourceRangeKey {
            addr: Addr::from_v4_octets([203, 0, 113, 9]),
            ..range
        },
    );
    assert_eq!(tables.source_ranges.get(&probe, 0).ok(), Some(1));
    assert_eq!(
        tables.config.get(&CONFIG_NETNS_COOKIE, 0).ok(),
        Some(cookie)
    );
    assert_eq!(
        tables.config.get(&CONFIG_SNAT_ADDR6, 0).ok(),
        Some(ConfigValue::default()),
        "the new slot starts empty"
    );
    let left_aside: Vec<_> = std::fs::read_dir(&dp.pin_dir)
        .expect("pin dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with("_carried"))
        .collect();
    assert!(left_aside.is_empty(), "{left_aside:?}");
}
