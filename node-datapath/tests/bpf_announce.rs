// SPDX-License-Identifier: Apache-2.0
//! L2 announcement of service addresses (`bpf/lib/arp.h`): bpf_host answers
//! ARP requests for the addresses the agent announced, with the underlay
//! device's MAC, and only for those. Byte-exact through BPF_PROG_TEST_RUN,
//! then with the kernel's own ARP in a client namespace on a veth to a node
//! namespace running the real program.
//! Root only (loading programs needs CAP_BPF).

mod bpf_support;

use std::net::Ipv4Addr;

use bpf_support::*;
use membrane_node_datapath::bpf::{Datapath, DatapathOptions, Hook, MacAddr, TcVerdict};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 11);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 200);
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 130);
const OTHER_LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 131);
const NODE_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xee, 0x0b]);
const CLIENT_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xee, 0xc8]);

const ALL_ON: DatapathOptions = DatapathOptions {
    redirect_peer: true,
    redirect_neigh: true,
};

/// An Ethernet ARP request "who has `target`? tell `sender`", broadcast.
fn arp_request(sender_mac: MacAddr, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&sender_mac.0);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac.0);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    // Padded to the Ethernet minimum, as on the wire.
    f.resize(60, 0);
    f
}

#[test]
fn an_arp_request_for_an_announced_address_is_answered_in_place_with_the_device_mac() {
    if !privileged(
        "an_arp_request_for_an_announced_address_is_answered_in_place_with_the_device_mac",
    ) {
        return;
    }
    let pins = PinDir::new();
    let mut dp = Datapath::load(pins.path(), &ALL_ON).expect("load datapath");
    // BPF_PROG_TEST_RUN runs the program on the loopback device (ifindex 1).
    dp.set_l2_device(1, NODE_MAC).expect("l2 device");
    let mut announcer = dp.l2_announcer().expect("announcer");
    announcer.announce(LB_ADDR).expect("announce");
    assert_eq!(announcer.announced().expect("list"), vec![LB_ADDR]);

    let request = arp_request(CLIENT_MAC, CLIENT, LB_ADDR);
    let out = dp.test_run(Hook::Host, &request).expect("run");
    assert_eq!(out.verdict, TcVerdict::Redirect);
    let mut want = Vec::new();
    want.extend_from_slice(&CLIENT_MAC.0);
    want.extend_from_slice(&NODE_MAC.0);
    want.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    want.extend_from_slice(&NODE_MAC.0);
    want.extend_from_slice(&LB_ADDR.octets());
    want.extend_from_slice(&CLIENT_MAC.0);
    want.extend_from_slice(&CLIENT.octets());
    assert_eq!(&out.packet[..42], &want[..], "the ARP reply");
    assert_eq!(dp.metrics().expect("metrics").arp_replies.packets, 1);

    // Not announced, a gratuitous ARP, a reply: all left to the stack, untouched.
    for frame in [
        arp_request(CLIENT_MAC, CLIENT, OTHER_LB_ADDR),
        arp_request(CLIENT_MAC, LB_ADDR, LB_ADDR),
        {
            let mut reply = arp_request(CLIENT_MAC, CLIENT, LB_ADDR);
            reply[21] = 2;
            reply
        },
    ] {
        let out = dp.test_run(Hook::Host, &frame).expect("run");
        assert_eq!(out.verdict, TcVerdict::Ok);
        assert_eq!(out.packet, frame);
    }

    assert!(announcer.withdraw(LB_ADDR).expect("withdraw"));
    assert!(!announcer.withdraw(LB_ADDR).expect("withdraw again"));
    let out = dp.test_run(Hook::Host, &request).expect("run");
    assert_eq!(out.verdict, TcVerdict::Ok);
    assert_eq!(out.packet, request);
}

/// The MAC `ip -n ns neigh` resolved for `addr` on `dev`, if any.
fn neighbour(ns: &Netns, dev: &str, addr: Ipv4Addr) -> Option<String> {
    let out = run(&[
        "ip",
        "-n",
        &ns.name,
        "neigh",
        "show",
        &addr.to_string(),
        "dev",
        dev,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_owned)
}

/// Makes the client ask for `addr` (a ping triggers the ARP request; the
/// ping itself need not be answered).
fn resolve_from(client: &Netns, addr: Ipv4Addr) -> Option<String> {
    run(&["ip", "-n", &client.name, "neigh", "flush", "dev", "eth0"]);
    let _ = in_ns(
        &client.name,
        &["ping", "-n", "-c", "1", "-W", "1", &addr.to_string()],
    )
    .output()
    .expect("spawn ping");
    neighbour(client, "eth0", addr)
}

#[test]
fn a_client_on_the_underlay_resolves_only_announced_addresses_to_the_node() {
    if !privileged("a_client_on_the_underlay_resolves_only_announced_addresses_to_the_node") {
        return;
    }
    let node = Netns::new("arpnode");
    let client = Netns::new("arpclient");
    run(&[
        "ip",
        "-n",
        &node.name,
        "link",
        "add",
        "ul0",
        "address",
        &NODE_MAC.to_string(),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "address",
        &CLIENT_MAC.to_string(),
        "netns",
        &client.name,
    ]);
    for (ns, dev, addr) in [(&node, "ul0", NODE), (&client, "eth0", CLIENT)] {
        run(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            dev,
        ]);
        run(&["ip", "-n", &ns.name, "link", "set", dev, "up"]);
    }
    let ul0 = node.ifindex("ul0");
    let pins = PinDir::new();
    let dp = node.run_in(|| {
        let mut dp = Datapath::load(pins.path(), &ALL_ON).expect("load datapath");
        dp.attach(Hook::Host, ul0).expect("attach bpf_host");
        dp
    });
    let mut announcer = dp.l2_announcer().expect("announcer");
    announcer.announce(LB_ADDR).expect("announce");

    let node_mac = NODE_MAC.to_string();
    assert_eq!(resolve_from(&client, LB_ADDR).as_deref(), Some(&*node_mac));
    assert_eq!(resolve_from(&client, OTHER_LB_ADDR), None);
    // The node's own address is still the stack's to answer.
    assert_eq!(resolve_from(&client, NODE).as_deref(), Some(&*node_mac));
    assert!(dp.metrics().expect("metrics").arp_replies.packets >= 1);

    announcer.withdraw(LB_ADDR).expect("withdraw");
    assert_eq!(resolve_from(&client, LB_ADDR), None);
}
