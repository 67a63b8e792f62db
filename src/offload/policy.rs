//! The offload schedule's decisions, apart from the copying ([`super::Scheduler`] carries them
//! out): per forward pass and per decoder layer, whether the layer is recomputed in backward from
//! an input parked on the host (or kept on the device), or runs without recompute, its saved
//! tensors kept on the device or parked on the host tensor by tensor ([`Policy::pack`]); in
//! backward, which parked tensors start coming back while a layer runs its backward.
//!
//! The save decision comes from measured costs: a layer's saved bytes and forward time per token
//! (measured on its first step, when it is checkpointed), the link's bandwidth and the device
//! budget. Saving instead of recomputing pays when the bytes that do not fit the budget cross the
//! link in less time than the layer's forward takes (the copies then hide behind compute).
//!
//! Layers are numbered by the caller (their index in the model). A pass begins when a layer
//! index does not grow (the first layer of the next forward); handles carry the pass they were
//! made in, so two graphs alive at once never fetch each other's inputs.

use std::collections::{BTreeMap, BTreeSet};

/// What the policy needs to know once per model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyConfig {
    /// Offloaded inputs copied back ahead of the layer that recomputes (0: each input is copied
    /// back just before its own recompute).
    pub lookahead: usize,
    /// Layer calls with fewer tokens keep their input on the device (the copy would cost more
    /// than it saves).
    pub min_tokens: usize,
    /// The last layer run: its input stays on the device (its copy could not be hidden behind
    /// later compute). `None`: every layer may be offloaded.
    pub last_layer: Option<usize>,
    /// Device bytes for activations kept without recompute (whole layers, forward order, as
    /// measured by [`Policy::record_saved_bytes`]). `None`: every layer is checkpointed.
    pub budget_bytes: Option<u64>,
    /// When a layer may skip its recompute by parking its saved tensors on the host.
    pub save: SaveMode,
    /// Measured device-to-host bandwidth (bytes per second); `None`: unknown (never
    /// [`SaveMode::Auto`]-saves).
    pub link_bytes_per_s: Option<f64>,
    /// Saved tensors smaller than this stay on the device (`None`: [`MIN_PARKED_BYTES`]).
    pub min_parked_bytes: Option<usize>,
}

/// When a layer runs without recompute, its saved tensors kept or parked tensor by tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SaveMode {
    /// Never: every layer that does not fit the budget whole is checkpointed (recomputed).
    #[default]
    Never,
    /// When the measured costs say the copies hide behind the layer's forward.
    Auto,
    /// Every measured layer but the last (tests, and forcing it on for a measurement).
    Always,
}

/// Saved tensors smaller than this stay on the device by default: a copy would cost more (in
/// launch and bookkeeping) than the memory it frees.
pub const MIN_PARKED_BYTES: usize = 64 * 1024;

/// What one layer call does with its activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerPlan {
    /// Run as is, saving everything (it fits in the memory budget): no recompute.
    Keep,
    /// Run as is without recompute; each saved tensor is kept or parked ([`Policy::pack`]).
    Save,
    /// Checkpoint with the input parked in host memory.
    Offload,
    /// Checkpoint with the input kept on the device: the last layer.
    CheckpointLast,
    /// Checkpoint with the input kept on the device: fewer than `min_tokens` tokens.
    CheckpointShort,
    /// Checkpoint with the input kept on the device: the caller cannot copy this memory.
    CheckpointUnsupported,
}

impl LayerPlan {
    /// Short name for bindings and logs.
    pub fn name(self) -> &'static str {
        match self {
            LayerPlan::Keep => "keep",
            LayerPlan::Save => "save",
            LayerPlan::Offload => "offload",
            LayerPlan::CheckpointLast => "last",
            LayerPlan::CheckpointShort => "short",
            LayerPlan::CheckpointUnsupported => "unsupported",
        }
    }
}

/// Where an offloaded tensor belongs: the forward pass and the layer that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// Pass number, from 1 (0: made outside any pass, e.g. by a raw offload).
    pub pass: u64,
    /// Layer index within the pass.
    pub layer: usize,
}

/// What the memory budget kept in the latest pass, and what the save policy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetStats {
    /// The budget (`None`: no budget).
    pub budget_bytes: Option<u64>,
    /// Layers of the latest pass run without recompute, everything saved on the device.
    pub kept_layers: usize,
    /// Activation bytes kept on the device without recompute (whole layers and single tensors).
    pub kept_bytes: u64,
    /// Layers run without recompute with their saved tensors kept or parked one by one.
    pub saved_layers: usize,
    /// Layers checkpointed (recomputed in backward).
    pub recomputed_layers: usize,
    /// Saved tensors kept on the device / parked on the host, in [`LayerPlan::Save`] layers.
    pub tensors_kept: usize,
    /// See `tensors_kept`.
    pub tensors_parked: usize,
    /// Bytes sent to the host in the pass (each comes back once): layer inputs and saved tensors.
    pub parked_bytes: u64,
}

/// The policy's state: the pass in progress and the layers' measured sizes.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    cfg: PolicyConfig,
    pass: u64,
    last_seen: Option<usize>,
    stats: BudgetStats,
    /// Saved activation bytes and forward seconds per token, per layer (measured once).
    per_token: BTreeMap<usize, (f64, f64)>,
    /// Layers the budget keeps whole in this pass (chosen at its first layer) and their bytes.
    keep: BTreeSet<usize>,
    reserved: u64,
    /// Bytes of single saved tensors kept on the device in this pass.
    tensor_kept: u64,
    /// Host bytes the pool may still take (`None`: no cap).
    host_room: Option<u64>,
}

/// Measured recompute costs within this fraction of each other count as equal (timing noise: a
/// layer's GPU time includes any wait for the host), so equal layers are kept in forward order.
const SAME_COST: f64 = 0.75;

impl Policy {
    /// A policy with no pass begun yet.
    pub fn new(cfg: PolicyConfig) -> Self {
        Policy {
            cfg,
            ..Policy::default()
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// The pass in progress (0 before the first layer).
    pub fn pass(&self) -> u64 {
        self.pass
    }

    /// Forward reaches `layer` with `tokens` tokens (batch x sequence); `offloadable` says whether
    /// the caller's memory can be copied. Returns the pass this call belongs to and the plan.
    pub fn begin_layer(
        &mut self,
        layer: usize,
        tokens: usize,
        offloadable: bool,
    ) -> (u64, LayerPlan) {
        if self.last_seen.is_none_or(|prev| layer <= prev) {
            self.pass += 1;
            self.stats = BudgetStats {
                budget_bytes: self.cfg.budget_bytes,
                ..BudgetStats::default()
            };
            (self.keep, self.reserved) = self.layers_to_keep(tokens);
            self.tensor_kept = 0;
        }
        self.last_seen = Some(layer);
        let plan = self.plan(layer, tokens, offloadable);
        match plan {
            LayerPlan::Keep => self.stats.kept_layers += 1,
            LayerPlan::Save => self.stats.saved_layers += 1,
            _ => self.stats.recomputed_layers += 1,
        }
        (self.pass, plan)
    }

    fn plan(&mut self, layer: usize, tokens: usize, offloadable: bool) -> LayerPlan {
        if self.fits_budget(layer, tokens) {
            return LayerPlan::Keep;
        }
        if self.cfg.last_layer.is_some_and(|last| layer >= last) {
            LayerPlan::CheckpointLast
        } else if tokens < self.cfg.min_tokens {
            LayerPlan::CheckpointShort
        } else if !offloadable {
            LayerPlan::CheckpointUnsupported
        } else if self.saving_pays(layer, tokens) {
            LayerPlan::Save
        } else {
            LayerPlan::Offload
        }
    }

    /// Device bytes the budget has left in this pass for single tensors (the layers kept whole
    /// have theirs reserved).
    fn budget_left(&self) -> u64 {
        self.cfg.budget_bytes.map_or(0, |b| {
            b.saturating_sub(self.reserved)
                .saturating_sub(self.tensor_kept)
        })
    }

    /// The layers the budget keeps whole at `tokens` tokens per call: those whose recompute
    /// costs the most per saved byte (measured forward seconds over saved bytes) first, layers of
    /// equal cost in forward order, while their bytes fit. Unmeasured layers are checkpointed
    /// (the first step measures them).
    fn layers_to_keep(&self, tokens: usize) -> (BTreeSet<usize>, u64) {
        let Some(budget) = self.cfg.budget_bytes else {
            return (BTreeSet::new(), 0);
        };
        let mut by_cost: Vec<(usize, f64, u64)> = self
            .per_token
            .iter()
            .map(|(&l, &(b, s))| (l, s / b.max(1e-12), (b * tokens as f64).ceil() as u64))
            .collect();
        by_cost.sort_by(|a, b| b.1.total_cmp(&a.1));
        // Tiers of equal cost (within SAME_COST of the tier's most costly), each in layer order.
        let mut ordered = Vec::with_capacity(by_cost.len());
        let mut tier: Vec<(usize, u64)> = Vec::new();
        let mut tier_cost = f64::INFINITY;
        for (l, cost, need) in by_cost {
            if cost < SAME_COST * tier_cost {
                tier.sort_unstable();
                ordered.append(&mut tier);
                tier_cost = cost;
            }
            tier.push((l, need));
        }
        tier.sort_unstable();
        ordered.append(&mut tier);
        let mut left = budget;
        let mut keep = BTreeSet::new();
        for (l, need) in ordered {
            if need <= left {
                left -= need;
                keep.insert(l);
            }
        }
        (keep, budget - left)
    }

    /// Budget mode: keep the layer whole (no recompute) when the pass's choice names it.
    fn fits_budget(&mut self, layer: usize, tokens: usize) -> bool {
        if !self.keep.contains(&layer) {
            return false;
        }
        let per_token = self.per_token.get(&layer).map_or(0.0, |c| c.0);
        let need = (per_token * tokens as f64).ceil() as u64;
        self.stats.kept_bytes += need;
        true
    }

    /// Whether skipping the recompute of a measured layer pays: the saved bytes the budget cannot
    /// hold cross the link within the layer's forward time (so the copies hide behind compute),
    /// or the mode says always; in both cases they must fit in half the host room the pool has
    /// left (the other half stays for later layers' inputs), else the layer is recomputed.
    fn saving_pays(&self, layer: usize, tokens: usize) -> bool {
        let Some(&(bytes_pt, seconds_pt)) = self.per_token.get(&layer) else {
            return false;
        };
        let parked = (bytes_pt * tokens as f64 - self.budget_left() as f64).max(0.0);
        if self
            .host_room
            .is_some_and(|room| parked > room as f64 / 2.0)
        {
            return false;
        }
        match (self.cfg.save, self.cfg.link_bytes_per_s) {
            (SaveMode::Always, _) => true,
            (SaveMode::Auto, Some(bw)) if bw > 0.0 => parked / bw <= seconds_pt * tokens as f64,
            _ => false,
        }
    }

    /// The host bytes the pool may still take before its cap (`None`: no cap), read by the next
    /// layer's plan.
    pub fn set_host_room(&mut self, room: Option<u64>) {
        self.host_room = room;
    }

    /// A tensor of `nbytes` saved by a [`LayerPlan::Save`] layer: `true` keeps it on the device
    /// (it is small, or the budget still has room for it, spent tensor by tensor in forward
    /// order), `false` parks it on the host.
    pub fn pack(&mut self, nbytes: usize) -> bool {
        let n = nbytes as u64;
        let small = nbytes < self.cfg.min_parked_bytes.unwrap_or(MIN_PARKED_BYTES);
        let keep = small || n <= self.budget_left();
        if keep {
            self.stats.kept_bytes += n;
            if !small {
                self.tensor_kept += n;
            }
            self.stats.tensors_kept += 1;
        } else {
            self.stats.tensors_parked += 1;
        }
        keep
    }

    /// Count bytes sent to the host in this pass.
    pub fn count_parked(&mut self, nbytes: usize) {
        self.stats.parked_bytes += nbytes as u64;
    }

    /// Whether `layer`'s costs should be measured on its next recompute: in budget mode, or
    /// when saving may be chosen.
    pub fn wants_measure(&self, layer: usize) -> bool {
        (self.cfg.budget_bytes.is_some() || self.cfg.save != SaveMode::Never)
            && !self.per_token.contains_key(&layer)
    }

    /// Record what a layer's forward saved for backward, for `tokens` tokens.
    pub fn record_saved_bytes(&mut self, layer: usize, bytes: u64, tokens: usize) {
        self.record_layer_cost(layer, bytes, 0.0, tokens)
    }

    /// Record a layer's measured costs: the bytes its forward saved for backward and the seconds
    /// the forward took, for `tokens` tokens.
    pub fn record_layer_cost(&mut self, layer: usize, bytes: u64, seconds: f64, tokens: usize) {
        let t = tokens.max(1) as f64;
        self.per_token
            .insert(layer, (bytes as f64 / t, seconds.max(0.0) / t));
    }

    /// Change the device budget (from the next pass on).
    pub fn set_budget(&mut self, budget_bytes: Option<u64>) {
        self.cfg.budget_bytes = budget_bytes;
    }

    /// What the budget and the save policy did in the latest pass.
    pub fn budget_stats(&self) -> BudgetStats {
        BudgetStats {
            budget_bytes: self.cfg.budget_bytes,
            ..self.stats
        }
    }

    /// Backward reaches `layer` of `pass`: of the `offloaded` handles (id, tag, already on their
    /// way back), in offload order, the ones to start copying back now, in order. Every handle of
    /// the `lookahead` nearest earlier layers of the same pass is kept in flight (newest layer
    /// first, a layer's tensors in the order they were saved); handles already on their way count
    /// towards that depth.
    pub fn prefetch_order<I>(&self, pass: u64, layer: usize, offloaded: I) -> Vec<u64>
    where
        I: DoubleEndedIterator<Item = (u64, Tag, bool)>,
    {
        let mut layers_seen = 0;
        let mut current = None;
        let mut out: Vec<(usize, u64)> = Vec::new();
        for (id, tag, in_flight) in offloaded.rev() {
            if tag.pass != pass || tag.layer >= layer {
                continue;
            }
            if current != Some(tag.layer) {
                if layers_seen == self.cfg.lookahead {
                    break;
                }
                layers_seen += 1;
                current = Some(tag.layer);
            }
            if !in_flight {
                out.push((tag.layer, id));
            }
        }
        // Newest layer first; within a layer, saved order (backward reads them in reverse, but
        // all of them are needed before the layer's backward ends).
        out.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        out.into_iter().map(|(_, id)| id).collect()
    }
}
