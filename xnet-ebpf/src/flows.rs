//! Flow sampling: one packet in the segment's `flow_sample` goes to the agent through the
//! `FLOW_SAMPLES` ring buffer, which aggregates samples into IPFIX flow records. Only
//! packets whose flow record the pipeline filled (routed, steered, denied, or passed for
//! a route or neighbour) are sampled; a full ring buffer drops the sample, never the packet.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use xnet_common::{FlowSample, IfConfig, Reason};

use crate::maps::FLOW_SAMPLES;

#[inline(always)]
pub fn sample(ifc: &IfConfig, ingress: u32, egress: u32, reason: Reason, bytes: u64) {
    if ifc.sample == 0 || !has_flow(reason) {
        return;
    }
    // SAFETY: a helper without arguments.
    if unsafe { bpf_get_prandom_u32() } % ifc.sample != 0 {
        return;
    }
    let Some(flow) = crate::policy::flow() else {
        return;
    };
    let f = &flow[0];
    let s = FlowSample {
        src: f.src,
        dst: f.dst,
        ingress,
        egress,
        segment: ifc.segment,
        rule: f.matched as u32,
        bytes: bytes as u32,
        sport: f.sport,
        dport: f.dport,
        family: f.family,
        proto: f.proto,
        reason: reason as u8,
        _pad: 0,
    };
    let _ = FLOW_SAMPLES.output(&s, 0);
}

/// Reasons given after the parse stage filled the flow record.
#[inline(always)]
fn has_flow(r: Reason) -> bool {
    matches!(
        r,
        Reason::Forwarded
            | Reason::Steered
            | Reason::DropPolicy
            | Reason::DropFailClosed
            | Reason::PassNoRoute
            | Reason::PassTunnel
            | Reason::PassNoNeighbour
    )
}
