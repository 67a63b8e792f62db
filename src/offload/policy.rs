//! The offload schedule's decisions, apart from the copying ([`super::Scheduler`] carries them
//! out): per forward pass and per decoder layer, whether the layer's input goes to the host, stays
//! on the device, or whether the layer runs without any recompute (memory budget); in backward,
//! which offloaded inputs start coming back while a layer recomputes.
//!
//! Layers are numbered by the caller (their index in the model). A pass begins when a layer
//! index does not grow (the first layer of the next forward); handles carry the pass they were
//! made in, so two graphs alive at once never fetch each other's inputs.

use std::collections::BTreeMap;

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
}

/// What one layer call does with its activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerPlan {
    /// Run as is, saving everything (it fits in the memory budget): no recompute.
    Keep,
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

/// What the memory budget kept in the latest pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetStats {
    /// The budget (`None`: no budget).
    pub budget_bytes: Option<u64>,
    /// Layers of the latest pass run without recompute.
    pub kept_layers: usize,
    /// Their measured activation bytes.
    pub kept_bytes: u64,
}

/// The policy's state: the pass in progress and the layers' measured sizes.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    cfg: PolicyConfig,
    pass: u64,
    last_seen: Option<usize>,
    kept_bytes: u64,
    kept_layers: usize,
    /// Saved activation bytes per token, per layer (measured once, on a recompute).
    per_token: BTreeMap<usize, f64>,
}

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
            self.kept_bytes = 0;
            self.kept_layers = 0;
        }
        self.last_seen = Some(layer);
        (self.pass, self.plan(layer, tokens, offloadable))
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
        } else {
            LayerPlan::Offload
        }
    }

    /// Budget mode: keep the layer (no recompute) while this pass's kept bytes stay within the
    /// budget; layers not measured yet are checkpointed (the first step measures them).
    fn fits_budget(&mut self, layer: usize, tokens: usize) -> bool {
        let (Some(budget), Some(per_token)) = (self.cfg.budget_bytes, self.per_token.get(&layer))
        else {
            return false;
        };
        let need = (per_token * tokens as f64).ceil() as u64;
        if self.kept_bytes.saturating_add(need) > budget {
            return false;
        }
        self.kept_bytes += need;
        self.kept_layers += 1;
        true
    }

    /// Whether `layer`'s saved bytes should be measured on its next recompute (budget mode only).
    pub fn wants_measure(&self, layer: usize) -> bool {
        self.cfg.budget_bytes.is_some() && !self.per_token.contains_key(&layer)
    }

    /// Record what a layer's forward saved for backward, for `tokens` tokens.
    pub fn record_saved_bytes(&mut self, layer: usize, bytes: u64, tokens: usize) {
        self.per_token
            .insert(layer, bytes as f64 / tokens.max(1) as f64);
    }

    /// What the budget kept in the latest pass.
    pub fn budget_stats(&self) -> BudgetStats {
        BudgetStats {
            budget_bytes: self.cfg.budget_bytes,
            kept_layers: self.kept_layers,
            kept_bytes: self.kept_bytes,
        }
    }

    /// Backward reaches `layer` of `pass`: of the `offloaded` handles (id, tag, already on their
    /// way back), in offload order, the ones to start copying back now, in order. The `lookahead`
    /// nearest earlier layers of the same pass are kept in flight; handles already on their way
    /// count towards that depth.
    pub fn prefetch_order<I>(&self, pass: u64, layer: usize, offloaded: I) -> Vec<u64>
    where
        I: DoubleEndedIterator<Item = (u64, Tag, bool)>,
    {
        offloaded
            .rev()
            .filter(|(_, tag, _)| tag.pass == pass && tag.layer < layer)
            .take(self.cfg.lookahead)
            .filter(|&(_, _, in_flight)| !in_flight)
            .map(|(id, _, _)| id)
            .collect()
    }
}
