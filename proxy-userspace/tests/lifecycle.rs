//! Starting on a machine that is not ready: clear refusals instead of damage.

mod support;

use ebpf_proxy::datapath::{attach, loader::Datapath};
use support::datapath::TestDatapath;

#[test]
fn a_pin_directory_outside_bpffs_is_refused_clearly() {
    let dir = std::env::temp_dir().join(format!("epx-not-bpffs-{}", std::process::id()));
    let error = Datapath::load(&dir).err().expect("must refuse");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        format!("{error:#}").contains("is not on a bpf filesystem"),
        "{error:#}"
    );
}

#[test]
fn pinned_maps_of_another_layout_are_refused_clearly() {
    let dp = TestDatapath::new();
    let pin_dir = dp.pin_dir.clone();
    drop(dp); // unpins everything
    std::fs::create_dir_all(&pin_dir).expect("pin dir");
    // A CONNTRACK left by a version whose entries were 8 bytes.
    let conntrack = pin_dir.join("CONNTRACK");
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&conntrack)
        .args([
            "type",
            "lru_hash",
            "key",
            "40",
            "value",
            "8",
            "entries",
            "1024",
            "name",
            "CONNTRACK",
        ])
        .status()
        .expect("bpftool");
    assert!(created.success());
    let error = Datapath::load(&pin_dir).err().expect("must refuse");
    let _ = attach::cleanup(&pin_dir);
    let message = format!("{error:#}");
    assert!(
        message.contains("CONNTRACK: pinned key/value/entries 40/8/1024"),
        "{message}"
    );
    assert!(message.contains("ebpf-proxy cleanup"), "{message}");
}
