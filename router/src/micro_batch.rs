//! Two-batch overlap: a step's sequences split into micro-batches that run at once, each on
//! its own thread, so that while one micro-batch's MoE layer is at the expert nodes, another's
//! attention and gate run here (DeepSeek's and SGLang's two-batch overlap). The nodes answer
//! each micro-batch's dispatches in turn on the same streams.
//!
//! Tokens do not change: every row's arithmetic is independent of its batch-mates, and a
//! sequence stays whole in one micro-batch. A step either succeeds in every micro-batch or
//! leaves no trace: a micro-batch that fails rolls its own caches back, and the others' are
//! rolled back here, so the scheduler can run the step again.

use moe_model::dense::{DenseStep, Pick, StepOutput, StepSequence};
use moe_model::Result;

use crate::expert_reach::ExpertReach;

/// Where to cut `tokens` (each sequence's tokens this step, in step order) into at most
/// `parts` contiguous non-empty groups of about equal tokens: the start index of every group
/// after the first.
pub fn split_points(tokens: &[usize], parts: usize) -> Vec<usize> {
    let parts = parts.min(tokens.len()).max(1);
    let total: usize = tokens.iter().sum();
    let mut cuts = Vec::with_capacity(parts - 1);
    let mut seen = 0;
    for (i, &t) in tokens.iter().enumerate() {
        let made = cuts.len() + 1;
        if made == parts {
            break;
        }
        let left = tokens.len() - i;
        // Cut before `i` once this group holds its share, or when every later sequence must
        // start a group of its own to reach `parts`.
        let share = total * made / parts;
        if i > 0 && (seen >= share || left == parts - made) {
            cuts.push(i);
        }
        seen += t;
    }
    cuts
}

/// One step of `seqs`, as micro-batches cut at `cuts` ([`split_points`]) and run at once (one
/// batch when there is no cut). Outputs come back in `seqs` order, each as much of its
/// logits as `picks` asks ([`DenseStep::forward_picking`]).
pub fn forward(
    dense: &dyn DenseStep,
    experts: &ExpertReach,
    seqs: &mut [StepSequence<'_>],
    picks: &[Pick],
    cuts: &[usize],
) -> Result<Vec<StepOutput>> {
    // Cuts that do not split `seqs` into non-empty groups (not what `split_points` makes) run
    // the step as one batch: the same tokens.
    let valid = cuts.first().is_some_and(|&c| c > 0)
        && cuts.last().is_some_and(|&c| c < seqs.len())
        && cuts.windows(2).all(|w| w[0] < w[1]);
    if !valid {
        return dense.forward_picking(seqs, experts.backend(), picks);
    }
    let marks: Vec<_> = seqs.iter().map(|s| s.cache.mark()).collect();
    let mut groups: Vec<(&mut [StepSequence<'_>], &[Pick])> = Vec::with_capacity(cuts.len() + 1);
    let mut rest = &mut *seqs;
    let mut at = 0;
    let picks_of = |from: usize, to: usize| picks.get(from..to).unwrap_or(&[]);
    for &cut in cuts {
        let (head, tail) = rest.split_at_mut(cut - at);
        groups.push((head, picks_of(at, cut)));
        rest = tail;
        at = cut;
    }
    let end = at + rest.len();
    groups.push((rest, picks_of(at, end)));
    let outcomes: Vec<Result<Vec<StepOutput>>> = std::thread::scope(|scope| {
        let mut groups = groups.into_iter().enumerate();
        let first = groups.next();
        let others: Vec<_> = groups
            .map(|(i, (group, picks))| {
                scope.spawn(move || {
                    let mb = experts.micro_batch(i as u32);
                    dense.forward_picking(group, mb.backend(), picks)
                })
            })
            .collect();
        let mut outcomes = Vec::with_capacity(others.len() + 1);
        if let Some((_, (group, picks))) = first {
            outcomes.push(dense.forward_picking(group, experts.micro_batch(0).backend(), picks));
        }
        for handle in others {
            outcomes.push(handle.join().unwrap_or_else(|_| {
                Err(moe_model::ModelError::ExpertBackend(
                    "a micro-batch's thread panicked".into(),
                ))
            }));
        }
        outcomes
    });
    let mut logits = Vec::with_capacity(marks.len());
    let mut failure = None;
    for outcome in outcomes {
        match outcome {
            Ok(rows) => logits.extend(rows),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        None => Ok(logits),
        Some(e) => {
            // Undo the micro-batches that succeeded (a failed one has undone itself), so the
            // whole step can run again.
            for (s, mark) in seqs.iter_mut().zip(&marks) {
                s.cache.rollback(mark);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(tokens: &[usize], parts: usize) -> Vec<usize> {
        let cuts = split_points(tokens, parts);
        let mut bounds = vec![0];
        bounds.extend(&cuts);
        bounds.push(tokens.len());
        bounds
            .windows(2)
            .map(|w| {
                assert!(w[0] < w[1], "an empty group in {cuts:?}");
                tokens[w[0]..w[1]].iter().sum()
            })
            .collect()
    }

    #[test]
    fn steps_split_into_contiguous_groups_of_about_equal_tokens() {
        assert_eq!(groups(&[1; 8], 2), vec![4, 4]);
        assert_eq!(groups(&[1; 7], 2), vec![3, 4]);
        assert_eq!(groups(&[1, 1, 1, 1, 12], 2), vec![4, 12]);
        assert_eq!(groups(&[12, 1, 1, 1, 1], 2), vec![12, 4]);
        assert_eq!(groups(&[5, 5, 5], 3), vec![5, 5, 5]);
        assert_eq!(groups(&[9, 1, 1], 3), vec![9, 1, 1]);
        assert_eq!(groups(&[1, 1, 9], 3), vec![1, 1, 9]);
        // Fewer sequences than parts: one each; one sequence or one part: no cut.
        assert_eq!(groups(&[3, 4], 4), vec![3, 4]);
        assert!(split_points(&[7], 2).is_empty());
        assert!(split_points(&[1, 2, 3], 1).is_empty());
        assert!(split_points(&[], 2).is_empty());
    }
}
