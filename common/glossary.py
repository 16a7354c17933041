"""What every score the atlas shows means: one definition per score, read by every page.

``TERMS`` is the only copy of the texts: the atlas's column headers, card chips and sort menu take
their plain name and one-line tooltip from it (``term``), and its glossary page (glossary.html)
lists every entry in full: what the score measures, its range, how to read it and which seed
paper it comes from. ``verdict`` turns a neuron's verification into the sentence its page opens
with, by the rule written in the ``margin`` entry.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SOURCES = {  # seed documents (../shared/seeds/), as the glossary cites them
    "000": "the thesis (seed 000: conceptual description of neurons with VLMs)",
    "001": "Describe-and-Refine (seed 001)",
    "002": "Neurobasket (seed 002)",
    "003": "SemanticLens (seed 003)",
    "004": "SIEVE (seed 004: select, hypothesise and verify)",
    "004v": "SIEVE's verification step (seed 004); the correlation and precision measures are "
            "neuron-atlas's",
    "atlas": "neuron-atlas itself (not in the seeds)",
}

GROUPS = [  # glossary sections, in page order
    ("verdict", "Verdict and verification (stage 09)"),
    ("triage", "Triage: does the neuron respond at all (stage 09)"),
    ("crops", "Its top crops: one concept or several (stage 09)"),
    ("layer", "Per layer (09 summary, 05 clusters)"),
    ("debug", "Debugging a confusion (stage 08)"),
    ("neuron", "The neuron itself (stages 01, 05)"),
    ("baskets", "Baskets: sets of neurons tied to groups of images (stage 11)"),
    ("labels", "Labels: each neuron's best concept of a list (stage 15)"),
    ("audit", "Audit of a class against valid and spurious concepts (stage 13)"),
]
Z_95 = 1.959963984540054  # standard normal quantile for a two-sided 95 % interval


@dataclass(frozen=True)
class Term:
    """One score: its names and the texts that explain it."""

    name: str       # plain name, lower case: column headers, sort menu, glossary heading
    short: str      # label on a layer card's chip
    tip: str        # one line: the tooltip (``title``) wherever the score appears
    measures: str   # glossary: what it measures
    range: str      # glossary: the values it can take
    reading: str    # glossary: how to read it
    source: str     # a key of SOURCES
    group: str      # a key of GROUPS


TERMS: dict[str, Term] = {
    "margin": Term(
        "margin over control", "margin",
        "Verified r minus control r, with a 95 % interval: the basis of the verdict.",
        "How much better the neuron's own sentence predicts its activation on held-out images "
        "of the test half than another neuron's sentence does on the same images: d = r − r_c "
        "(verified r minus control r). Its 95 % interval is a paired bootstrap: the images are "
        "drawn with replacement (1,000 times by default), both correlations are recomputed on "
        "each draw, and the 2.5th and 97.5th percentiles of the differences are the interval's "
        "ends. Files written before 09 stored the interval get Zou's (2007) interval from the "
        "two Fisher-z intervals instead, which treats the two correlations as independent.",
        "−2 … 2, with a 95 % interval.",
        "The verdict a neuron page opens with: described reliably when the whole interval is "
        "above 0 and verified r is above 0; described weakly when the margin is above 0 but its "
        "interval reaches 0; not better than chance when the margin is 0 or below. No verdict "
        "when 09 has no verified or control r, or fewer than 4 held-out images.",
        "atlas", "verdict"),
    "margin_low": Term(
        "margin, interval low", "margin low",
        "Lower end of the margin's 95 % bootstrap interval: above 0, the sentence beats its "
        "control beyond luck.",
        "The 2.5th percentile of the margin over bootstrap draws of the test-half images.",
        "−2 … 2.",
        "The verdict needs it above 0.",
        "atlas", "verdict"),
    "margin_high": Term(
        "margin, interval high", "margin high",
        "Upper end of the margin's 95 % bootstrap interval.",
        "The 97.5th percentile of the margin over bootstrap draws of the test-half images.",
        "−2 … 2.",
        "Below 0: the control sentence does better, beyond luck.",
        "atlas", "verdict"),
    "verdict": Term(
        "verdict", "verdict",
        "reliable (interval above 0 and r > 0), weak (margin > 0, interval reaching 0), chance, "
        "or none.",
        "09's verdict on the sentence by the rule of the margin entry, stored beside the "
        "margin.",
        "reliable, weak, chance or none.",
        "Trust a sentence marked reliable; read a weak one as a lead.",
        "atlas", "verdict"),
    "control_description": Term(
        "control sentence", "control",
        "The other neuron's sentence the margin is measured against.",
        "The sentence of the control neuron, kept beside the margin so that it can be read.",
        "Text.",
        "A control close in meaning to the sentence makes a small margin expected.",
        "atlas", "verdict"),
    "activation_rate": Term(
        "Activation Rate", "AR",
        "Share of the concept's images (the matcher's top picks) on which the neuron is in its "
        "top 1 %.",
        "SIEVE's Activation Rate with retrieved images: on the test half of the held-out "
        "images, the matcher's highest-ranked images for the sentence, as many as the neuron "
        "has images at or above its top-1 % threshold there, and the share of them at or above "
        "it.",
        "0 … 1; by chance about the share of positives (1 %).",
        "Near 1: images of the concept make the neuron fire; near 0: they do not.",
        "004", "verdict"),
    "ar_kept": Term(
        "kept by SIEVE's filter", "AR kept",
        "1 when the hypothesis's Activation Rate is at least its layer's mean (SIEVE's filter).",
        "On hypotheses only (a selected neuron's sentence, or each of its sub-concepts' when it "
        "is split): whether its Activation Rate reaches the layer's mean rate.",
        "0 or 1; empty when not a hypothesis.",
        "0: SIEVE would discard this hypothesis.",
        "004", "verdict"),
    "first_corr": Term(
        "first sentence's verification", "first r",
        "Verification r of the sentence the neuron started from (03's), before refinement.",
        "The same Pearson correlation as the verification, on the same test-half images, for "
        "the first sentence instead of the one DnR's refinement chose.",
        "−1 … 1.",
        "Below the verification r: the refinement found a sentence that fits the neuron "
        "better; equal: it kept the first.",
        "001", "verdict"),
    "selection_corr": Term(
        "selection score", "selection r",
        "A candidate sentence's verification r on the selection half, by which DnR ranks "
        "candidates.",
        "Pearson correlation of the matcher's score for the candidate with the neuron's "
        "per-image maximum on the selection half of the held-out images (never the test half, "
        "so that choosing does not inflate the reported figures).",
        "−1 … 1.",
        "The chosen sentence has the highest; the others are the candidates it beat.",
        "001", "verdict"),
    "distinct_sentences": Term(
        "distinct sentences", "distinct",
        "Different final sentences among the layer's neurons (after refinement).",
        "The number of different chosen sentences over the layer's neurons.",
        "A count, at most the number of neurons.",
        "Far below the neuron count: many neurons share one sentence, which then tells them "
        "apart poorly.",
        "atlas", "layer"),
    "distinct_first": Term(
        "distinct first sentences", "distinct first",
        "Different sentences among the layer's neurons before refinement (03's).",
        "The number of different first sentences over the layer's neurons.",
        "A count, at most the number of neurons.",
        "Compare with the distinct sentences after refinement.",
        "atlas", "layer"),
    "dnr_consistency": Term(
        "semantic consistency (DnR)", "consistency",
        "DnR's top-20 score: α · mean top activation (scaled) + (1 − α) · similarity², α = 0.5.",
        "Over the 20 test-half held-out images where the neuron fires most: α times their "
        "mean activation divided by the layer's largest, plus 1 − α times the square of the "
        "sentence's mean match there, as a percentile of the matcher's scores (0.5 by chance). "
        "α is 09's --alpha (0.5).",
        "0 … 1 for a layer without negative activations.",
        "Higher: the neuron fires strongly and its strongest images match the sentence. A "
        "ranking score, not a test against a control.",
        "001", "verdict"),
    "trust": Term(
        "trust order", "trust",
        "Rank in the layer's trust order (1 first): reliably described, then weakly, then by "
        "chance; dead and unverified neurons last.",
        "The order in which a layer page lists its neurons by default, most trustworthy "
        "description first. Neurons are ranked by (1) dead ones last; (2) their verdict: "
        "described reliably, then weakly, then not better than chance, then no verdict, then "
        "not scored; (3) within a verdict, the lower end of the margin's 95 % interval, high "
        "first (a margin known to be large beats a larger but less certain one); (4) verified "
        "r, high first; (5) channel.",
        "1 … the layer's neuron count.",
        "Read the first cards of a layer to see what it has learned that its descriptions can "
        "be trusted for; the last ones are noise or unexplained.",
        "atlas", "verdict"),
    "verify_corr": Term(
        "verified r", "verified r",
        "Pearson r between how well images match the sentence and the neuron's activation, on "
        "held-out images.",
        "Whether the description predicts the neuron: a concept matcher scores every image "
        "for the sentence, and the scores are correlated with the neuron's per-image maximum "
        "on images the sentence was not written from (not in its mosaic).",
        "−1 … 1; empty when not computable (no sentence, too few images).",
        "0: the sentence says nothing about when the neuron fires; higher is better. Read it "
        "against control r: a generic sentence can reach a positive r too.",
        "004v", "verdict"),
    "control_corr": Term(
        "control r", "control r",
        "The same correlation for another neuron's sentence: what an unrelated description "
        "reaches on these images.",
        "Verified r computed with the sentence of another neuron of the layer (drawn with a "
        "seed among those that say something else: each has a word the other lacks), against "
        "this neuron's activation, on the same "
        "held-out images.",
        "−1 … 1.",
        "The baseline: a description is informative only by how far its verified r exceeds "
        "this (see the margin).",
        "atlas", "verdict"),
    "verify_auprc": Term(
        "verified precision (AP)", "verified AP",
        "Average precision with which the sentence's match scores find the neuron's top 1 % "
        "of held-out images.",
        "Ranks the held-out images by how well they match the sentence and measures how early "
        "the neuron's strongest images (its top 1 %, at least 5) come.",
        "0 … 1; a random ranking scores about positives ÷ held-out images.",
        "Higher is better; it rewards finding the rare best images, where r weighs every image.",
        "004v", "verdict"),
    "control_auprc": Term(
        "control precision (AP)", "control AP",
        "Verified precision reached by the control neuron's sentence on the same images.",
        "Average precision of the control sentence's match scores for this neuron's top 1 % "
        "held-out images.",
        "0 … 1.",
        "The baseline for verified precision.",
        "atlas", "verdict"),
    "n_held_out": Term(
        "held-out images", "held out",
        "Images used for verification: in the test half and not in the sentence's mosaic.",
        "How many images the verified and control r were computed on: the run's images are "
        "split, seeded, into a selection half (for ranking candidate sentences) and a test half; "
        "every reported figure uses the test half, minus the sentence's mosaic.",
        "A count (at least 10 for a correlation).",
        "More images give a narrower interval on the margin.",
        "004v", "verdict"),
    "n_positives": Term(
        "positives", "positives",
        "Held-out images counted as the neuron's hits for precision (its top 1 %, at least 5).",
        "The held-out images with the highest activation, which the precision scores look for.",
        "A count.",
        "Precision by chance is about positives ÷ held-out images.",
        "004v", "verdict"),
    "control_channel": Term(
        "control neuron", "control #",
        "The neuron of this layer whose sentence served as the control.",
        "Which other neuron's description was used as the control sentence.",
        "A channel number of the same layer.",
        "Not a score: its sentence is shown on the neuron page, to judge how different it is.",
        "atlas", "verdict"),
    "selectivity": Term(
        "selectivity", "selectivity",
        "How much more the neuron fires on its best images than on a typical one "
        "(99th percentile ÷ median).",
        "The 99th percentile of the neuron's per-image maximum divided by its median, after "
        "shifting negative values; the median is floored at 1 % of the range.",
        "1 … 100.",
        "Near 1: fires about as much everywhere (a texture, or nothing). High: responds to "
        "something rare. 100: silent on most images.",
        "004", "triage"),
    "dnr_score": Term(
        "top-20 strength", "top-20",
        "Mean of log(1 + activation) over the neuron's 20 strongest images.",
        "How strongly the neuron fires on its best images, damped by a logarithm so a few "
        "extreme values do not dominate.",
        "0 or more (negative activations count as 0).",
        "Higher: a stronger response to its best images. Compare within a layer; scales "
        "differ between layers.",
        "001", "triage"),
    "dead": Term(
        "dead", "dead",
        "1 when the neuron hardly varies across images (spread ≤ 5 % of its layer's median).",
        "Whether the neuron's spread (99th percentile − median of its per-image maximum) is at "
        "most 5 % of the median spread of its layer.",
        "0 or 1.",
        "1: its mosaic and sentence describe noise; ignore its description.",
        "atlas", "triage"),
    "clarity": Term(
        "clarity", "clarity",
        "How alike the neuron's top crops look to an image embedder (mean pairwise cosine).",
        "The mean cosine between the image vectors of every pair of the neuron's top crops (on "
        "a sub-concept row: of that sub-concept's crops).",
        "−1/(n − 1) … 1 for n crops.",
        "High: one consistent visual concept. Low: mixed crops, which one sentence is likely "
        "to describe only in part.",
        "003", "crops"),
    "polysemanticity": Term(
        "polysemanticity", "polysemantic",
        "How far apart two groups of its top crops are (1 − cosine of the groups' summed "
        "vectors).",
        "The top crops are split in two by Ward clustering; the score is 1 minus the cosine of "
        "the two groups' summed vectors.",
        "0 … 2.",
        "Near 0: one concept. High: at least two; see its sub-concepts.",
        "003", "crops"),
    "redundancy": Term(
        "redundancy", "redundancy",
        "Cosine of its mean crop vector with the closest other neuron's of the same layer.",
        "How close the neuron's average top crop is to that of the most similar other neuron of "
        "its layer.",
        "−1 … 1.",
        "Near 1: another neuron responds to the same kind of image.",
        "003", "crops"),
    "selected": Term(
        "selected (SIEVE)", "selected",
        "1 when SIEVE's selection keeps the neuron (not dead, selectivity ≥ SELECT); per layer: "
        "how many.",
        "SIEVE's gate on the ratio p99 / median of the neuron's per-image maximum (its "
        "selectivity): 09's --select β, the paper's 10; 0 (the default) keeps every neuron that "
        "is not dead. Only selected neurons are clustered and give hypotheses.",
        "0 or 1 per neuron; a count per layer.",
        "09 prints, per layer, how many neurons each β from 2 to 12 would keep.",
        "004", "crops"),
    "crop_clusters": Term(
        "crop groups", "groups",
        "How many groups the silhouette chose for the neuron's top-20 crops (1: one concept).",
        "SIEVE's clustering: Ward agglomerative clustering of the top-20 crop vectors into 2 or "
        "3 groups, the one with the higher cosine silhouette kept if it beats the silhouette "
        "that one cloud of the same spread reaches (95th percentile of 10 seeded draws); else "
        "1.",
        "1 … 3; empty when the neuron was not clustered.",
        "2 or 3: each group has its own sentence (the sub-concept rows).",
        "004", "crops"),
    "share": Term(
        "share of crops", "share",
        "Fraction of the neuron's top crops that fall in this sub-concept (1 for the neuron).",
        "For a sub-concept: the share of the neuron's embedded top crops in its group.",
        "0 … 1.",
        "A large share: the main concept; a small one: a side concept.",
        "004", "crops"),
    "n_crops": Term(
        "crops embedded", "crops",
        "How many of its top crops had an image vector (for clarity, polysemanticity, "
        "redundancy).",
        "The number of the neuron's top crops that 04 embedded.",
        "A count.",
        "Below 4 the crop scores are left empty; with few crops they are noisy.",
        "atlas", "crops"),
    "share_beating_control": Term(
        "share beating control", "beats control",
        "Share of the layer's verified neurons whose sentence beats its control (by r).",
        "Over a layer's neurons with a margin and its interval: the share whose margin "
        "(verified r − control r) is above 0.",
        "0 … 1.",
        "About 0.5 means the layer's sentences do no better than other neurons' sentences.",
        "atlas", "layer"),
    "share_beating_control_auprc": Term(
        "share beating control (AP)", "beats control AP",
        "Share of the layer's verified neurons whose precision is above their control's.",
        "As share beating control, with verified precision instead of r.",
        "0 … 1.",
        "About 0.5 means no better than chance.",
        "atlas", "layer"),
    "share_reliable": Term(
        "share described reliably", "reliable",
        "Share of the layer's verified neurons whose verdict is reliable (margin's interval "
        "above 0).",
        "Over a layer's neurons with a margin and its interval: the share whose verdict is "
        "reliable.",
        "0 … 1.",
        "The strict counterpart of share beating control, which counts any margin above 0.",
        "atlas", "layer"),
    "split": Term(
        "neurons split", "split",
        "How many of the layer's neurons have 2 or 3 crop groups, each with its own sentence.",
        "The layer's neurons whose crop groups (SIEVE's clustering) number 2 or 3.",
        "A count.",
        "The others keep one sentence.",
        "004", "layer"),
    "hypotheses": Term(
        "hypotheses", "hypotheses",
        "The layer's hypotheses with an Activation Rate: selected neurons' sentences, or their "
        "sub-concepts'.",
        "Per selected neuron: its sentence when its crops form one group, else each "
        "sub-concept's sentence; counted when it has an Activation Rate.",
        "A count.",
        "SIEVE's filter keeps those at or above the mean rate.",
        "004", "layer"),
    "hypotheses_kept": Term(
        "hypotheses kept", "kept",
        "Hypotheses whose Activation Rate reaches the layer's mean (SIEVE's filter).",
        "The hypotheses with ar_kept = 1.",
        "A count.",
        "About half, unless the rates are skewed.",
        "004", "layer"),
    "mean_ar_kept": Term(
        "mean Activation Rate after the filter", "mean AR kept",
        "Layer mean Activation Rate over the hypotheses SIEVE's filter keeps.",
        "The mean Activation Rate recomputed over the hypotheses at or above the layer's mean "
        "rate, as SIEVE reports it.",
        "0 … 1.",
        "Compare with the mean before the filter (mean Activation Rate).",
        "004", "layer"),
    "n_selection": Term(
        "selection half", "selection",
        "Usable images in the selection half (for ranking candidate sentences; no figure uses "
        "them).",
        "The seeded half of the usable images kept apart for choosing between candidate "
        "sentences.",
        "A count.",
        "Not a score.",
        "atlas", "layer"),
    "n_test": Term(
        "test half", "test",
        "Usable images in the test half, on which every reported figure is measured.",
        "The other half of the usable images; a sentence is verified on those not in its "
        "mosaic.",
        "A count.",
        "Not a score.",
        "atlas", "layer"),
    "dead_neurons": Term(
        "dead neurons", "dead",
        "How many of the layer's neurons are dead.",
        "The number of the layer's neurons flagged dead.",
        "A count.",
        "Their descriptions describe noise.",
        "atlas", "layer"),
    "neurons": Term(
        "neurons", "neurons", "How many neurons (channels) the layer has.",
        "The layer's channel count.", "A count.", "Not a score.", "000", "layer"),
    "k": Term(
        "clusters", "clusters", "How many clusters of similar descriptions 05 made in the layer.",
        "The number of clusters 05 chose for the layer's neuron embeddings (by silhouette).",
        "1 or more.", "Each cluster is a family of neurons with related descriptions.",
        "000", "layer"),
    "silhouette": Term(
        "silhouette", "silhouette",
        "How well separated the layer's description clusters are (05).",
        "The mean silhouette of 05's clustering: how much closer each neuron is to its own "
        "cluster than to the next.",
        "−1 … 1; empty for a single cluster.",
        "Above 0.5: clear families; near 0: overlapping ones.",
        "000", "layer"),
    "better": Term(
        "clusters better", "better",
        "Which embedding of the sentences, text or fused (text + mosaic), clusters the layer "
        "better (05).",
        "05 clusters each layer's text and fused embeddings and counts, per kind, the metrics on "
        "which it beats the other: cohesion higher, silhouette higher, Davies–Bouldin lower.",
        "text, fused, or tie (neither wins two of the three).",
        "The thesis found fused better on every layer; the atlas's maps and clusters use the "
        "fused kind unless told otherwise.",
        "000", "layer"),
    "z": Term(
        "shift on errors (z)", "z",
        "How differently the neuron fires on misclassified than on correct images of the class, "
        "in its standard deviations.",
        "08's z = Δμ / σ: the mean activation on misclassified (KO) minus that on correctly "
        "classified (OK) images of the true class, over σ, the pooled standard deviation of the "
        "two groups.",
        "Any real number; it does not grow with the number of images.",
        "Positive: fires more on the errors. The thesis flags |z| ≥ 2 (flag_z); trust q for a "
        "flag that accounts for testing every neuron.",
        "000", "debug"),
    "t": Term(
        "t statistic", "t",
        "z scaled by the number of images: Δμ over its standard error (Student's two-sample t).",
        "08's t = Δμ / (σ·√(1/n_KO + 1/n_OK)); its p-value (Welch's) gives q.",
        "Any real number; grows with the number of images for the same shift.",
        "|t| ≥ 2 happens to about 5 % of neurons by chance alone: not a flag on its own.",
        "atlas", "debug"),
    "q": Term(
        "FDR q-value", "q",
        "t's p-value adjusted for testing every neuron (Benjamini–Hochberg); flag_fdr: q ≤ FDR.",
        "The smallest false-discovery rate at which the neuron would be flagged, over all "
        "neurons 08 tested for the pair.",
        "0 … 1.",
        "Small (≤ 0.05): a shift unlikely to be one of the chance hits among many neurons.",
        "atlas", "debug"),
    "relevance": Term(
        "relevance to the wrong class", "relevance",
        "Activation × gradient of the wrong class's logit, summed over space, averaged over the "
        "pair's misclassified images.",
        "A first-order estimate of how much the wrongly predicted class's logit would drop "
        "with the neuron switched off.",
        "Any real number.",
        "Positive: the neuron pushed the images towards the wrong class; large values point "
        "at the cause of the error.",
        "003", "debug"),
    "error_share": Term(
        "share of the error", "share",
        "The neuron's part of the push from the true to the predicted class on this image, among "
        "all neurons of its layer (activation × gradient).",
        "08's contribution of the neuron to logit(predicted) − logit(true): its activation × the "
        "gradient of that difference, summed over the feature map, divided by the sum of the "
        "absolute contributions of every neuron of its layer on the same image. Every layer splits "
        "(to first order) the same logit difference among its neurons, so shares of different "
        "layers compare, and neurons of all layers rank together.",
        "−1 … 1; the absolute shares of one layer add up to 1 (100 %).",
        "Large and positive: much of what made the network choose the wrong class passes through "
        "this neuron; its map shows where on the image it fired. Negative: it argued for the "
        "true class. On a pair's page: the mean over its attributed images. A layer of few "
        "channels splits the push among few neurons, so each gets a larger share: read it with "
        "'times an even share'.",
        "atlas", "debug"),
    "error_lift": Term(
        "times an even share", "× even",
        "The share of the error over the share every neuron of the layer would get from an even "
        "split (1 / channels).",
        "share of the error × the number of channels of the neuron's layer.",
        "−channels … channels; 1 is an even split.",
        "Well above 1: the neuron stands out in its layer; this favours wide layers as the share "
        "favours narrow ones, so the two together say how exceptional and how large the "
        "neuron's part is.",
        "atlas", "debug"),
    "error_relevance": Term(
        "contribution to the error", "contribution",
        "Activation × gradient of logit(predicted) − logit(true), summed over space: the "
        "neuron's share before it is divided by its layer's total.",
        "A first-order estimate of how much the gap between the wrong and the right class's "
        "logits would shrink with the neuron switched off.",
        "Any real number, in logit units; compare within a layer (use the share across layers).",
        "Positive: the neuron widened the gap towards the wrong class.",
        "003", "debug"),
    "connection": Term(
        "connection strength", "connection",
        "How much one neuron drives a neuron of the next chosen layer: activation × gradient, "
        "averaged over 06's sample of images.",
        "For neuron i of a layer and neuron j of the next chosen layer: i's activation map times "
        "the gradient of j's spatial mean with respect to it, summed over the map and averaged "
        "over CONNECT_IMAGES sampled images (06_connections.npz): how much j's mean would drop, "
        "to first order, with i switched off.",
        "Any real number, in the later layer's units.",
        "Positive: i drives j; negative: i holds j back. A neuron page lists the largest in "
        "absolute value; compare within one pair of layers only.",
        "atlas", "neuron"),
    "connection_link": Term(
        "cluster connection strength", "link strength",
        "A cluster's share of the drive into a cluster of the next layer over the share their "
        "sizes would give: 1 is random wiring.",
        "With the negative connections set to 0: (summed connection strength from cluster A's "
        "neurons to cluster B's / the layer pair's total) ÷ (|A|·|B| / (N·M)), N and M the "
        "clustered neurons of the two layers. The trace by connections links each cluster to "
        "the one it drives most when this is at least CONNECT_THRESHOLD (default 1). Its "
        "p-value is the share of 999 random clusterings of the source layer (same sizes) whose "
        "cluster does as well, the real one counted.",
        "0 … N·M / (|A|·|B|); p-value 0.001 … 1.",
        "Above 1: A drives B more than random wiring would. A link with p > 0.05 is drawn faint: "
        "random sets of as many neurons do as well, so the clusters (made from sentences) are "
        "not wired together beyond chance.",
        "atlas", "layer"),
    "top_activation": Term(
        "top activation", "top act",
        "The neuron's highest response over all images (its best image's spatial maximum).",
        "The largest value of the neuron's activation map over every image of the run.",
        "Any real number, in the layer's own units.",
        "Compare within a layer only.",
        "000", "neuron"),
    "receptive_field": Term(
        "receptive field", "field",
        "The part of the input that one cell of the layer sees; a mosaic tile shows it, grey "
        "where it lies outside the image.",
        "The square of input pixels that can influence the layer's cell where the neuron fired "
        "most on an image (computed from the network's kernels and strides, common/rf.py). A "
        "mosaic tile shows that square; where it runs past the image's border the network saw "
        "padding, and the tile is grey there. A field at least as large as the image shows the "
        "whole image.",
        "Its side in input pixels: from 1 (the first layers) to more than the image (deep "
        "layers).",
        "Much grey in a layer's tiles: its fields are large next to the image and the neuron "
        "often fires near the border; the lightbox shows each tile's image whole.",
        "000", "neuron"),
    "activation_map": Term(
        "activation map", "map",
        "Where on an image the neuron fires: its layer's output for that image, one value per "
        "cell, drawn over the image.",
        "The neuron's output at every cell of its layer for one image, stretched over the "
        "image. The atlas draws it for the layers whose maps 01 stored (the small, deep ones), "
        "yellow where the neuron fires most and clear where it is silent, on one scale per "
        "neuron (its top activation), so a weaker image's map is fainter. For the other layers "
        "the lightbox dims everything but the tile's receptive field.",
        "0 (silent) … the neuron's top activation.",
        "A map over the object the sentence names supports the sentence; a map on the "
        "background or a border points at what the neuron really detects.",
        "000", "neuron"),
    "channel": Term(
        "channel", "#", "The neuron's index in its layer.",
        "The channel number of the neuron in the layer's output.", "0 … channels − 1.",
        "Not a score.", "000", "neuron"),
    "cluster": Term(
        "cluster", "cluster", "05's cluster of neurons with similar descriptions.",
        "The cluster 05 put the neuron in, from its description (and mosaic) embedding.",
        "0 … clusters − 1.", "Not a score: neurons of a cluster say similar things.",
        "000", "neuron"),
    "basket_cohesion": Term(
        "cohesion", "cohesion",
        "Mean silhouette of the basket's images in its FINCH level (corr baskets: the members' "
        "mean correlation).",
        "How much closer the basket's images are to each other than to the next cluster of "
        "the same level: the mean silhouette (cosine distance on the layer's per-image channel "
        "means). A cluster whose cohesion lies more than 2 standard deviations below its "
        "level's mean is dropped. For corr baskets: the members' mean pairwise correlation.",
        "−1 … 1.", "Higher: a tighter group of images.", "002", "baskets"),
    "purity": Term(
        "purity", "purity",
        "How alike the model's top-5 predictions of the basket's images are (mean cosine to "
        "their mean).",
        "The offline stand-in for the paper's caption purity: each image's top-5 class "
        "probabilities as a vector, and the mean cosine between those vectors and their mean. "
        "Clusters more than 2 standard deviations below their level's mean are dropped.",
        "0 … 1.", "1: the model sees every image of the basket alike.", "002", "baskets"),
    "db_ratio": Term(
        "Davies–Bouldin ratio", "R_i",
        "The cluster's worst (spread_i + spread_j) / distance between centres; high: it "
        "overlaps another cluster.",
        "The simplified Davies–Bouldin index of one cluster, R_i = max over the other clusters "
        "j of (s_i + s_j) / d(c_i, c_j), s the mean distance of a cluster's images to its centre "
        "c. Clusters more than 2 standard deviations above their level's mean are dropped.",
        "0 … ∞.", "Lower: better separated from the level's other clusters.", "002", "baskets"),
    "consistency": Term(
        "activation consistency", "consistency",
        "Mean pairwise cosine of the basket's neurons' activations over its images (Eq. 5).",
        "Each neuron of the basket gives a vector, its activation (channel mean) on each of the "
        "basket's images; the consistency is the mean cosine over all pairs of those vectors. "
        "Compared with random-index sets of the same size on the same images.",
        "0 … 1 for non-negative activations (−1 … 1 otherwise); empty for a single neuron.",
        "Higher than its random-index baseline: the neurons rise and fall together on the "
        "basket's images.", "002", "baskets"),
    "delta_prob": Term(
        "Δprob", "Δprob",
        "Mean change of p(class) on the class's labelled images when a basket is zeroed.",
        "For class y: zero the neurons of a basket whose name mentions y, re-run the model on "
        "y's labelled images and average p_pruned(y|x) − p(y|x); beside random other baskets "
        "and random-index sets of the same size, over seeded repeats (mean ± std).",
        "−1 … 1.", "More negative than the random baselines: the basket carries the class.",
        "002", "baskets"),
    "concept_label": Term(
        "concept label", "label",
        "The neuron's best concept of the list (make label), kept when its score clears the margin.",
        "Stage 15 scores every concept of a list (CONCEPTS, or the shipped common/concepts.txt) "
        "against the neuron and keeps the best one as its label when that concept score exceeds "
        "LABEL_MARGIN; otherwise the neuron is unlabelled.",
        "A phrase of the list, or unlabelled.",
        "A summary in the list's words; open the mosaic before trusting it, and read an "
        "unlabelled neuron as one the list has no word for.", "003", "labels"),
    "label_score": Term(
        "concept score", "concept",
        "Cosine with the concept's text minus cosine with the empty text (SemanticLens Eq. 4).",
        "cos(neuron, concept) − cos(neuron, empty text). The neuron's vector is its sentence's "
        "text vector (or, with a CLIP image embedder, the mean vector of its top crops); the "
        "empty text's cosine is what any phrase scores through the text model alone, so it is "
        "taken off.", "−2 … 2; in practice −0.2 … 0.8.",
        "Above the margin (0.3 by default): the concept describes the neuron; near 0: no more "
        "than an empty phrase.", "003", "labels"),
    "label_baseline": Term(
        "empty-text baseline", "baseline",
        "Cosine of the neuron's vector with the empty text: what any phrase scores for free.",
        "The cosine between the neuron's vector and the text model's vector of the empty text, "
        "subtracted from each concept's cosine.", "−1 … 1.",
        "High for vague neurons, whose vectors are close to every phrase; it explains why a high "
        "cosine may still leave a neuron unlabelled.", "003", "labels"),
    "label_margin": Term(
        "score over the threshold", "over",
        "Concept score minus LABEL_MARGIN: above 0 the neuron is labelled.",
        "The best concept score less the threshold a label needs (LABEL_MARGIN).",
        "−2 … 2.", "The further above 0, the clearer the label; below 0, unlabelled.", "003",
        "labels"),
    "labelled": Term(
        "labelled neurons", "labelled",
        "Neurons of the layer whose best concept clears the margin over the empty text.",
        "The number of the layer's neurons that stage 15 gave a label, of those it scored (those "
        "with a vector in 04).", "0 … the layer's neurons.",
        "Few: the list lacks this layer's concepts (early layers: add textures and colours).",
        "003", "labels"),
    "missing_concepts": Term(
        "missing concepts", "missing",
        "Concepts of the list no neuron of the layer aligns with beyond the margin: gaps.",
        "A concept is missing in a layer when its score with every neuron of the layer stays at "
        "or below LABEL_MARGIN (SemanticLens §4.1.2: knowledge the model lacks).",
        "A list of phrases.", "A concept the model should know but misses here points at data "
        "to add; early layers miss objects by nature.", "003", "labels"),
    "concept_images": Term(
        "images with / without", "with / without",
        "The class's images the concept matcher finds showing the concept, and not showing it.",
        "The run's concept matcher (MATCHER, as in the verification) scores each of the class's "
        "usable images for the spurious concept; the class's top quarter by that score counts as "
        "showing it, its bottom half as not (the quarter between is left out as borderline). "
        "Under 5 on either side, no reliance is measured.",
        "0 … the class's images.", "Few on one side: the test says little about this concept.",
        "atlas", "audit"),
    "reliance_auc": Term(
        "reliance AUC", "AUC",
        "AUC of the class's logit separating its images with the concept from those without.",
        "SemanticLens's model test: how well the class's output tells images with a spurious "
        "concept from images without it, here as the ROC AUC of the class's logit with the "
        "images showing the concept as positives; before → with the class's spurious-aligned "
        "relevant neurons zeroed, beside random sets of the same size (mean ± std). The paper "
        "compares the class's real images with images generated to show the spurious concept "
        "alone (there, high means well separated); without an image generator, the class's own "
        "images with and without the concept stand in.",
        "0 … 1; 0.5 when the concept changes nothing.",
        "Above 0.5: the class is scored higher when the concept is present — it relies on it. "
        "Closer to 0.5 after zeroing than with random sets: the zeroed neurons carried that "
        "reliance.", "003", "audit"),
    "reliance_gap": Term(
        "logit gap", "gap",
        "Mean class logit of its images with the concept minus that of those without.",
        "The same two groups of the class's images as the reliance AUC; the difference of their "
        "mean logits for the class, before → zeroed, beside random sets of the same size "
        "(mean ± std). Unlike the AUC it says by how much, not only how consistently.",
        "Any real number, in logit units; 0 when the concept changes nothing.",
        "Shrinking towards 0 when the spurious-aligned neurons are zeroed, more than with random "
        "sets: the reliance went through them.", "atlas", "audit"),
    "accuracy_zeroed": Term(
        "accuracy before → zeroed", "accuracy",
        "Class accuracy before and with its spurious-aligned relevant neurons zeroed (random sets: "
        "mean ± std).",
        "Share of the class's sampled labelled images (PRUNE_IMAGES) predicted as the class, by "
        "the model as it is and with the spurious-aligned neurons among the class's most "
        "relevant zeroed (SemanticLens's correction by pruning, without retraining); in brackets "
        "the same with random sets of as many neurons of the layer zeroed, over CONTROLS seeded "
        "sets.", "0 … 1.",
        "A drop much larger than with random sets: the class needs those neurons; no drop while "
        "the reliance falls: the correction is cheap.", "003", "audit"),
}
ALIASES = {"mean_dnr": "dnr_score", "mean_ar": "activation_rate"}  # 09 summary columns not named mean_<score column>
PAIRED = ("z ", "relevance ")  # 10's per-pair columns: "z <true>→<pred>", "relevance <true>→<pred>"


def term(key: str) -> dict:
    """The plain name, chip label, tooltip and glossary anchor of column ``key`` (a dict for
    templates and JSON): 09's and 05's columns, 09's summary (``mean_<score>``: the layer's
    mean) and 10's per-pair columns; an unknown column keeps its own name and has no tooltip."""
    for prefix in PAIRED:
        if key.startswith(prefix):
            t = TERMS[prefix.strip()]
            pair = key[len(prefix):]
            return {"key": key, "name": f"{t.name}, {pair}", "short": f"{t.short} {pair}",
                    "tip": f"{t.tip} Pair {pair}.", "anchor": prefix.strip()}
    if key in TERMS:
        t = TERMS[key]
        return {"key": key, "name": t.name, "short": t.short, "tip": t.tip, "anchor": key}
    base = ALIASES.get(key, key.removeprefix("mean_"))
    if key.startswith("mean_") and base in TERMS:
        t = TERMS[base]
        return {"key": key, "name": f"mean {t.name}",
                "short": f"mean {t.short}", "tip": f"Layer mean: {t.tip[0].lower()}{t.tip[1:]}",
                "anchor": base}
    return {"key": key, "name": key.replace("_", " "), "short": key.replace("_", " "), "tip": "",
            "anchor": ""}


def glossary() -> list[dict]:
    """The glossary page's sections: per group its title and full entries, in ``GROUPS`` order."""
    return [{"id": group, "title": title,
             "terms": [{"key": key, **asdict(t), "source": SOURCES[t.source]}
                       for key, t in TERMS.items() if t.group == group]}
            for group, title in GROUPS]


VERDICTS = {  # verdict level → (headline, CSS class)
    "reliable": ("Described reliably", "good"),
    "weak": ("Described weakly", "weak"),
    "chance": ("Not better than chance", "bad"),
    "none": ("No verdict", "none"),
}


def verdict(scores: dict) -> dict | None:
    """The verdict on a neuron's sentence from its 09 scores (``verify_corr``, ``control_corr``,
    ``n_held_out``, and the bootstrap interval ``margin_low``, ``margin_high`` where 09 stored
    it), by the rule of ``TERMS["margin"]`` (``common.scores.verdict_level``); None when the
    neuron has no 09 row.

    Returns ``{level, headline, css, margin, low, high, verify, control, n, why}``; ``level`` is
    "none" (with ``why``) when the neuron was not verified.
    """
    from common.scores import margin_interval, verdict_level
    if not scores:
        return None
    r, rc, n = scores.get("verify_corr"), scores.get("control_corr"), scores.get("n_held_out")
    out = {"verify": r, "control": rc, "n": n, "margin": None, "low": None, "high": None,
           "why": ""}
    if r is None:
        out["why"] = "09 could not verify this neuron's sentence (no sentence, or too few images)."
    elif rc is None:
        out["why"] = "09 found no control sentence for this neuron."
    elif n is None or n < 4 or not all(math.isfinite(v) for v in (r, rc)):
        out["why"] = "too few held-out images for an interval."
    if out["why"]:
        return {**out, "level": "none", "headline": VERDICTS["none"][0],
                "css": VERDICTS["none"][1]}
    if scores.get("margin_low") is not None and scores.get("margin_high") is not None:
        out["margin"], out["low"], out["high"] = (scores.get("margin", r - rc),
                                                  scores["margin_low"], scores["margin_high"])
    else:  # a 09 file from before the bootstrap interval
        out["margin"], out["low"], out["high"] = margin_interval(r, rc, int(n), Z_95)
    level = verdict_level(r, out["margin"], out["low"])
    return {**out, "level": level, "headline": VERDICTS[level][0], "css": VERDICTS[level][1]}


TRUST_RANKS = {"reliable": 0, "weak": 1, "chance": 2, "none": 3}  # verdict → place in the order


def trust_key(scores: dict) -> tuple:
    """Sort key of a neuron in the trust order of ``TERMS["trust"]`` (smaller: first), from its 09
    scores (empty: not scored); the channel, step (5), is the caller's tie-breaker."""
    v = verdict(scores)
    dead = bool(scores.get("dead")) if scores else False
    level = TRUST_RANKS[v["level"]] if v else len(TRUST_RANKS)
    low = v["low"] if v and v["low"] is not None else -math.inf
    r = scores.get("verify_corr") if scores else None
    return (dead, level, -low, -(r if r is not None and math.isfinite(r) else -math.inf))
