//! The offload schedule (the policy and the scheduler carrying it out over layer boundaries),
//! driven through the host transport as the Python binding drives it, with leases that name the
//! buffer they hold so the test sees when each one is let go.

use rslora_fast::cuda::RawStream;
use rslora_fast::offload::{
    Action, HostTransport, LayerPlan, Policy, PolicyConfig, Scheduler, Tag,
};

const S: RawStream = RawStream(0);

/// A lease naming what it holds: `(layer, is_destination)`.
type Lease = (usize, bool);
type Sched = Scheduler<HostTransport, Lease, usize>;

fn cfg(lookahead: usize, last_layer: Option<usize>) -> PolicyConfig {
    PolicyConfig {
        lookahead,
        min_tokens: 0,
        last_layer,
        budget_bytes: None,
    }
}

/// One training step over `layers` layers: forward offloads what the policy says, backward
/// fetches each layer's input through the plan. Returns the pass and checks the bytes came back.
fn step(s: &mut Sched, layers: usize, srcs: &[Vec<u8>]) -> u64 {
    let mut pass = 0;
    let mut handles = vec![None; layers];
    for (i, h) in handles.iter_mut().enumerate() {
        let (p, plan) = s.begin_layer(i, 4096, true).unwrap();
        pass = p;
        if plan == LayerPlan::Offload {
            let src = &srcs[i];
            // SAFETY: `src` outlives the synchronous host copy.
            *h = Some(unsafe {
                s.offload_layer(i, src.as_ptr() as usize, src.len(), S, (i, false), i)
                    .unwrap()
            });
        }
    }
    let mut dsts: Vec<Vec<u8>> = srcs.iter().map(|b| vec![0u8; b.len()]).collect();
    for i in (0..layers).rev() {
        for (id, nbytes, layer) in s.backward_plan(pass, i, handles[i]) {
            assert_eq!(nbytes, srcs[layer].len());
            let dst = dsts[layer].as_mut_ptr() as usize;
            // SAFETY: dsts[layer] holds `nbytes` and outlives the synchronous copy.
            unsafe { s.prefetch_leased(id, dst, S, (layer, true)).unwrap() };
        }
        if let Some(h) = handles[i] {
            assert_eq!(s.take_ready(h, S).unwrap(), Some((i, true)));
            assert_eq!(dsts[i], srcs[i], "layer {i}'s input came back intact");
            s.release(h).unwrap();
        }
    }
    pass
}

fn srcs(layers: usize) -> Vec<Vec<u8>> {
    (0..layers)
        .map(|i| (0..1000 + i).map(|j| (j * 7 + i) as u8).collect())
        .collect()
}

/// Layers whose copy back started, in order.
fn prefetch_order(s: &Sched) -> Vec<usize> {
    s.trace()
        .iter()
        .filter_map(|a| match a {
            Action::Prefetch(t) => Some(t.layer),
            _ => None,
        })
        .collect()
}

/// For each prefetched layer: the last layer that had taken its input back when the copy
/// started (`usize::MAX`: none yet). Backward of layer `k` runs after `k + 1` took its input.
fn started_during(s: &Sched) -> Vec<(usize, usize)> {
    let mut current = usize::MAX;
    let mut out = Vec::new();
    for a in s.trace() {
        match a {
            Action::Prefetch(t) => out.push((t.layer, current)),
            Action::Ready(t) => current = t.layer,
            Action::Offload(_) => {}
        }
    }
    out
}

#[test]
fn the_policy_orders_prefetches_by_lookahead_within_a_pass() {
    let layers = 6;
    let data = srcs(layers);
    for depth in [0usize, 1, 2, 4] {
        let mut s = Sched::with_policy(HostTransport::new(), cfg(depth, Some(layers - 1)), None);
        s.set_trace(true);
        step(&mut s, layers, &data);
        // The last layer kept its input: layers 0..=4 went out and came back, newest first.
        assert_eq!(prefetch_order(&s), vec![4, 3, 2, 1, 0], "depth {depth}");
        // Layer j's copy back starts in the backward of layer j + depth (the last layer's for
        // the first `depth` of them; depth 0: its own), i.e. after layer j + depth + 1 took its
        // input back; the last layer (5) and layer 4 came before any input was taken back.
        for (layer, during) in started_during(&s) {
            let backward_of = (layer + depth).min(layers - 1);
            let expected = if backward_of + 1 >= layers - 1 {
                usize::MAX
            } else {
                backward_of + 1
            };
            assert_eq!(during, expected, "depth {depth}, layer {layer}");
        }
        assert_eq!(s.stats().pool.in_use_bytes, 0);
        assert_eq!(s.stats().live_handles, 0);
    }
}

#[test]
fn a_source_is_let_go_one_layer_later_and_a_destination_when_taken() {
    let mut s = Sched::with_policy(HostTransport::new(), cfg(1, Some(3)), None);
    let data = srcs(4);
    let mut handles = Vec::new();
    for (i, src) in data.iter().enumerate().take(3) {
        assert_eq!(s.begin_layer(i, 4096, true).unwrap().1, LayerPlan::Offload);
        // SAFETY: `src` outlives the synchronous copy.
        handles.push(unsafe {
            s.offload_layer(i, src.as_ptr() as usize, src.len(), S, (i, false), i)
                .unwrap()
        });
        // The newest copy overlaps the layer about to run; the one before may now be freed.
        let freed = s.take_freed();
        let expected: Vec<Lease> = if i == 0 { vec![] } else { vec![(i - 1, false)] };
        assert_eq!(freed, expected, "after offloading layer {i}");
    }
    // The last layer keeps its input: every copy out may finish now.
    assert_eq!(
        s.begin_layer(3, 4096, true).unwrap().1,
        LayerPlan::CheckpointLast
    );
    assert_eq!(s.take_freed(), vec![(2, false)]);
    // An abandoned graph: a prefetched buffer nobody took is let go on release, after a wait.
    let mut dst = vec![0u8; data[2].len()];
    for (id, _, layer) in s.backward_plan(1, 3, None) {
        assert_eq!(layer, 2);
        // SAFETY: `dst` holds the bytes and outlives the copy.
        unsafe {
            s.prefetch_leased(id, dst.as_mut_ptr() as usize, S, (2, true))
                .unwrap()
        };
    }
    s.release(handles[2]).unwrap();
    assert_eq!(s.take_freed(), vec![(2, true)]);
    assert_eq!(dst, data[2]);
    s.release_all().unwrap();
}

#[test]
fn two_graphs_alive_never_fetch_each_others_inputs() {
    let mut s = Sched::with_policy(HostTransport::new(), cfg(2, Some(3)), None);
    let data = srcs(4);
    let mut passes = Vec::new();
    for _ in 0..2 {
        for (i, src) in data.iter().enumerate() {
            let (p, plan) = s.begin_layer(i, 4096, true).unwrap();
            if i == 0 {
                passes.push(p);
            }
            if plan == LayerPlan::Offload {
                // SAFETY: `src` outlives the synchronous copy.
                unsafe {
                    s.offload_layer(i, src.as_ptr() as usize, src.len(), S, (i, false), i)
                        .unwrap()
                };
            }
        }
    }
    assert_eq!(passes, vec![1, 2]);
    // The second graph's backward at its last layer names its own layers 2 and 1 only.
    let plan: Vec<(usize, u64)> = s
        .backward_plan(2, 3, None)
        .into_iter()
        .map(|(id, _, layer)| (layer, id))
        .collect();
    assert_eq!(plan.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 1]);
    assert!(plan.iter().all(|&(_, id)| id > 3), "handles of pass 2 only");
    s.release_all().unwrap();
}

#[test]
fn the_plan_per_layer_follows_tokens_last_layer_budget_and_device() {
    let mut p = Policy::new(PolicyConfig {
        lookahead: 1,
        min_tokens: 512,
        last_layer: Some(3),
        budget_bytes: Some(10_000),
    });
    let plans: Vec<LayerPlan> = (0..4).map(|i| p.begin_layer(i, 1000, true).1).collect();
    use LayerPlan::*;
    assert_eq!(plans, vec![Offload, Offload, Offload, CheckpointLast]);
    assert_eq!(p.begin_layer(0, 100, true), (2, CheckpointShort));
    assert_eq!(p.begin_layer(1, 1000, false), (2, CheckpointUnsupported));
    // Measured layers are kept, in forward order, while the pass's kept bytes fit the budget:
    // 4 bytes per token x 1000 tokens = 4000 bytes each, so two of four fit 10,000.
    assert!(p.wants_measure(0));
    for i in 0..4 {
        p.record_saved_bytes(i, 4000 * 7, 7000);
    }
    assert!(!p.wants_measure(0));
    let plans: Vec<LayerPlan> = (0..4).map(|i| p.begin_layer(i, 1000, true).1).collect();
    assert_eq!(plans, vec![Keep, Keep, Offload, CheckpointLast]);
    let kept = p.budget_stats();
    assert_eq!((kept.kept_layers, kept.kept_bytes), (2, 8000));
    // A new pass starts the count again.
    assert_eq!(p.begin_layer(0, 1000, true), (4, Keep));
    assert_eq!(p.budget_stats().kept_layers, 1);
}

#[test]
fn prefetch_order_counts_copies_in_flight_towards_the_depth() {
    let p = Policy::new(cfg(2, None));
    let t = |layer| Tag { pass: 1, layer };
    let other = Tag { pass: 2, layer: 1 };
    // (id, tag, already on its way back), in offload order.
    let live = [
        (1, t(0), false),
        (2, t(1), false),
        (3, other, false),
        (4, t(2), true),
    ];
    assert_eq!(p.prefetch_order(1, 3, live.into_iter()), vec![2]);
    assert_eq!(p.prefetch_order(1, 2, live.into_iter()), vec![2, 1]);
    assert!(p.prefetch_order(1, 0, live.into_iter()).is_empty());
    assert_eq!(p.prefetch_order(2, 5, live.into_iter()), vec![3]);
}
