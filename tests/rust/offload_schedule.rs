//! The offload schedule (the policy and the scheduler carrying it out over layer boundaries),
//! driven through the host transport as the Python binding drives it, with leases that name the
//! buffer they hold so the test sees when each one is let go.

use rslora_fast::cuda::RawStream;
use rslora_fast::offload::{
    Action, HostTransport, LayerPlan, Policy, PolicyConfig, SaveMode, Scheduler, Tag,
    MIN_PARKED_BYTES,
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
        ..PolicyConfig::default()
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
        ..PolicyConfig::default()
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

fn save_cfg(save: SaveMode, link: Option<f64>, budget: Option<u64>) -> PolicyConfig {
    PolicyConfig {
        lookahead: 1,
        min_tokens: 0,
        last_layer: Some(3),
        budget_bytes: budget,
        save,
        link_bytes_per_s: link,
        min_parked_bytes: None,
    }
}

/// Every layer saves 1000 bytes per token and its forward takes 1 us per token.
fn measured(cfg: PolicyConfig) -> Policy {
    let mut p = Policy::new(cfg);
    for i in 0..4 {
        p.record_layer_cost(i, 1000 * 4096, 4096e-6, 4096);
    }
    p
}

fn plans(p: &mut Policy, tokens: usize) -> Vec<LayerPlan> {
    (0..4).map(|i| p.begin_layer(i, tokens, true).1).collect()
}

#[test]
fn saving_is_chosen_when_the_parked_bytes_cross_the_link_within_the_forward() {
    use LayerPlan::*;
    // 1000 B/token over 2 GB/s = 0.5 us/token < 1 us/token of forward: the copies hide.
    let mut fast = measured(save_cfg(SaveMode::Auto, Some(2e9), None));
    assert_eq!(
        plans(&mut fast, 8192),
        vec![Save, Save, Save, CheckpointLast]
    );
    // Over 0.5 GB/s it would take 2 us/token: recompute from the offloaded input instead.
    let mut slow = measured(save_cfg(SaveMode::Auto, Some(5e8), None));
    assert_eq!(
        plans(&mut slow, 8192),
        vec![Offload, Offload, Offload, CheckpointLast]
    );
    // ... unless the budget holds enough of a layer that the rest crosses in time. At 1000 tokens
    // a layer saves 1 MB and its forward takes 1 ms, in which the link moves 0.5 MB. Layer 0 is
    // kept whole; with 0.5 MB left, layer 1 parks the other 0.5 MB in time; its tensors spend the
    // budget, so layer 2 would park 1 MB (2 ms): recomputed.
    let mut budget = measured(save_cfg(SaveMode::Auto, Some(5e8), Some(1_500_000)));
    assert_eq!(budget.begin_layer(0, 1000, true).1, Keep);
    assert_eq!(budget.begin_layer(1, 1000, true).1, Save);
    assert!(budget.pack(500_000) && !budget.pack(500_000));
    assert_eq!(budget.begin_layer(2, 1000, true).1, Offload);
    // Unknown link: never saved; not measured: never saved; "never": never saved.
    let mut unknown = measured(save_cfg(SaveMode::Auto, None, None));
    assert_eq!(plans(&mut unknown, 8192)[0], Offload);
    let mut fresh = Policy::new(save_cfg(SaveMode::Always, Some(2e9), None));
    assert_eq!(plans(&mut fresh, 8192)[0], Offload);
    assert!(fresh.wants_measure(0));
    let mut never = measured(save_cfg(SaveMode::Never, Some(2e9), None));
    assert_eq!(plans(&mut never, 8192)[0], Offload);
    assert!(!Policy::new(save_cfg(SaveMode::Never, None, None)).wants_measure(0));
}

#[test]
fn saved_tensors_spend_the_budget_one_by_one_and_small_ones_stay() {
    let mut p = measured(save_cfg(SaveMode::Always, None, Some(300_000)));
    assert_eq!(p.begin_layer(0, 4096, true).1, LayerPlan::Save);
    let keeps: Vec<bool> = [
        200_000,
        200_000,
        100_000,
        MIN_PARKED_BYTES - 1,
        MIN_PARKED_BYTES,
    ]
    .into_iter()
    .map(|n| p.pack(n))
    .collect();
    assert_eq!(keeps, vec![true, false, true, true, false]);
    let st = p.budget_stats();
    assert_eq!(
        (st.tensors_kept, st.tensors_parked, st.saved_layers),
        (3, 2, 1)
    );
    assert_eq!(st.kept_bytes, 300_000 + MIN_PARKED_BYTES as u64 - 1);
}

#[test]
fn a_saving_layers_tensors_come_back_together_ahead_of_its_backward() {
    let mut s = Sched::with_policy(
        HostTransport::new(),
        save_cfg(SaveMode::Always, None, None),
        None,
    );
    for i in 0..4 {
        s.record_layer_cost(i, 1 << 30, 1.0, 1);
    }
    let big: Vec<Vec<u8>> = (0..3)
        .map(|i| vec![i as u8 + 1; MIN_PARKED_BYTES])
        .collect();
    let small = [9u8; 100];
    let mut parked = Vec::new();
    for layer in 0..3 {
        let (_, plan) = s.begin_layer(layer, 1, true).unwrap();
        assert_eq!(plan, LayerPlan::Save);
        drop(s.take_freed());
        // SAFETY: the buffers outlive the synchronous host copies.
        let kept = unsafe {
            s.pack_layer(
                layer,
                small.as_ptr() as usize,
                small.len(),
                S,
                (layer, false),
                layer,
            )
        };
        assert_eq!(kept.unwrap(), None, "a small tensor stays");
        assert_eq!(
            s.take_freed(),
            vec![(layer, false)],
            "its lease is given back at once"
        );
        for (k, b) in big.iter().enumerate() {
            // SAFETY: as above.
            let h = unsafe {
                s.pack_layer(
                    layer,
                    b.as_ptr() as usize,
                    b.len(),
                    S,
                    (layer, false),
                    layer,
                )
            };
            parked.push((layer, h.unwrap().unwrap()));
            if k == 0 && layer > 0 {
                // This layer's first copy lets the previous layer's sources go, all three.
                assert_eq!(s.take_freed(), vec![(layer - 1, false); 3]);
            }
        }
    }
    assert_eq!(
        s.begin_layer(3, 1, true).unwrap().1,
        LayerPlan::CheckpointLast
    );
    // Backward of the last layer: all three of layer 2's tensors start back, in saved order.
    let plan: Vec<(u64, usize)> = s
        .backward_plan(1, 3, None)
        .into_iter()
        .map(|(id, _, layer)| (id, layer))
        .collect();
    let layer2: Vec<(u64, usize)> = parked
        .iter()
        .filter(|p| p.0 == 2)
        .map(|&(l, h)| (h, l))
        .collect();
    assert_eq!(plan, layer2);
    assert_eq!(s.budget_stats().parked_bytes, 9 * MIN_PARKED_BYTES as u64);
    s.release_all().unwrap();
}

#[test]
fn the_budget_keeps_the_layers_whose_recompute_costs_most_per_byte() {
    use LayerPlan::*;
    let mut p = Policy::new(save_cfg(SaveMode::Never, None, Some(2_000_000)));
    // 1000 B/token each; layers 1 and 3 take twice as long per token (e.g. global attention
    // among sliding-window layers): the budget's two layers go to them, not to the first two.
    for (i, secs) in [(0, 1e-6), (1, 2e-6), (2, 1.02e-6), (3, 1.98e-6)] {
        p.record_layer_cost(i, 1_000_000, secs * 1000.0, 1000);
    }
    assert_eq!(plans(&mut p, 1000), vec![Offload, Keep, Offload, Keep]);
    assert_eq!(p.budget_stats().kept_bytes, 2_000_000);
    // Costs within timing noise of each other count as equal: forward order.
    let mut q = Policy::new(save_cfg(SaveMode::Never, None, Some(2_000_000)));
    for (i, secs) in [(0, 1e-6), (1, 1.05e-6), (2, 1.02e-6), (3, 0.98e-6)] {
        q.record_layer_cost(i, 1_000_000, secs * 1000.0, 1000);
    }
    assert_eq!(
        plans(&mut q, 1000),
        vec![Keep, Keep, Offload, CheckpointLast]
    );
    // The budget is read at each pass's first layer.
    q.set_budget(Some(1_000_000));
    assert_eq!(
        plans(&mut q, 1000),
        vec![Keep, Offload, Offload, CheckpointLast]
    );
}

#[test]
fn a_layer_whose_saved_tensors_would_crowd_the_host_cap_is_recomputed() {
    // Each layer parks 1000 B/token; at 1000 tokens that is 1 MB, which must fit in half the
    // host room the pool has left.
    let mut p = measured(save_cfg(SaveMode::Always, None, None));
    p.set_host_room(Some(2_000_000));
    assert_eq!(p.begin_layer(0, 1000, true).1, LayerPlan::Save);
    p.set_host_room(Some(1_999_999));
    assert_eq!(p.begin_layer(1, 1000, true).1, LayerPlan::Offload);
    p.set_host_room(None);
    assert_eq!(p.begin_layer(2, 1000, true).1, LayerPlan::Save);
}
