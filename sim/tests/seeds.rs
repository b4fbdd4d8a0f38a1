//! The simulator on today's code: a few hundred seeds with every fault kind
//! break no invariant, a seed replays exactly, and the seeds that found
//! bugs stay fixed.

use cellbank_sim::{run_plan, run_seed, scenario, sweep, sweep_plans, Faults, Plan};

/// Seeds every change runs (about 11 s on two cores).
const CI_SEEDS: u64 = 300;

#[test]
fn a_few_hundred_seeds_with_every_fault_break_no_invariant() {
    let summary = sweep(1, CI_SEEDS, &Faults::all(), 2, 0, &|_| {});
    let failing: Vec<String> =
        summary.failures.iter().map(|f| format!("seed {}: {}", f.seed, f.violation.as_ref().unwrap())).collect();
    assert!(failing.is_empty(), "replay with `cellbank sim --seed N`:\n{}", failing.join("\n"));
    assert_eq!(summary.seeds, CI_SEEDS);
    // The runs did what they are for: failovers, acknowledged writes
    // checked, reads checked, faults injected.
    let s = &summary.stats;
    assert!(s.failovers >= CI_SEEDS / 10, "only {} failovers in {CI_SEEDS} seeds", s.failovers);
    assert!(s.acked >= CI_SEEDS * 100, "only {} acknowledged writes checked", s.acked);
    assert!(s.reads >= CI_SEEDS * 20, "only {} reads checked", s.reads);
    assert!(s.faults >= CI_SEEDS, "only {} faults", s.faults);
    assert!(s.lost > 0 && s.duplicated > 0, "the network lost or duplicated nothing");
    assert!(s.deliveries >= CI_SEEDS * 10, "only {} credit deliveries", s.deliveries);
    assert!(s.switchovers > 0 && s.forced_failovers > 0, "no operator action completed");
}

#[test]
fn a_seed_replays_exactly_and_another_seed_differs() {
    let a = run_seed(7, &Faults::all(), true);
    let b = run_seed(7, &Faults::all(), true);
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.stats.events, b.stats.events);
    assert_eq!(a.stats.messages, b.stats.messages);
    let c = run_seed(8, &Faults::all(), true);
    assert_ne!(a.trace, c.trace);
}

/// Found by comparing two sweeps: seed 40016 ran one of two ways, because
/// a replica that lost its leadership answered its waiting proposals and
/// reads in a hash map's order, which differs from one map to the next.
/// Ten runs in one process must give one trace.
#[test]
fn seed_40016_replays_exactly_every_time() {
    let first = run_seed(40016, &Faults::all(), true);
    for _ in 0..9 {
        let again = run_seed(40016, &Faults::all(), true);
        assert_eq!(again.stats.events, first.stats.events);
        assert_eq!(again.trace, first.trace);
    }
}

#[test]
fn a_run_without_faults_fails_nothing_over() {
    let plan = Plan::draw(1, &Faults::none());
    assert!(plan.faults.is_empty());
    let result = run_plan(1, &Faults::none(), plan, false);
    assert!(result.violation.is_none(), "{}", result.violation.unwrap());
    assert_eq!(result.stats.failovers, 0);
    assert!(result.stats.acked > 100, "only {} writes acknowledged", result.stats.acked);
}

/// Found by the simulator in the first 10,000 seeds (then seeds 8235 and
/// 9750): a degraded pair's resyncing active was told to stop waiting
/// (ASYNC) within one mode change, a status from before (SYNC, standby
/// caught up) returned the pair to sync, and a failover then lost writes
/// the active had acknowledged alone. The world has changed since (operator
/// actions, a second router), so those seeds replay other runs; these
/// three fail on today's code with that fix reverted (the coordinator's
/// step 3 recording such a change in the table first), and pass with it.
#[test]
fn seeds_839_2594_and_6575_lose_no_acknowledged_write() {
    for seed in [839, 2594, 6575] {
        let result = run_seed(seed, &Faults::all(), false);
        assert!(result.violation.is_none(), "seed {seed}: {}", result.violation.unwrap());
        assert!(result.stats.failovers >= 1, "seed {seed} no longer fails over: it tests nothing");
    }
}

/// Found by the simulator once operator actions were drawn: after a forced
/// failover of a DEGRADED pair the promoted cell reused outbox seqs that
/// the old active's lost tail had delivered, and the destination refused
/// those credits for ever. All three seeds failed before each epoch
/// numbered its credits from its own range.
#[test]
fn seeds_1439_1535_and_1681_deliver_every_credit_after_a_forced_failover() {
    for seed in [1439, 1535, 1681] {
        let result = run_seed(seed, &Faults::all(), false);
        assert!(result.violation.is_none(), "seed {seed}: {}", result.violation.unwrap());
        assert!(result.stats.forced_failovers >= 1, "seed {seed} no longer forces a failover: it tests nothing");
    }
}

/// The scenario the sender-epoch mutation needs, on today's code: every
/// seed passes, and the forced failovers lose only what they report.
/// Found by the 100,000-seed sweep: two operator actions on one pair in
/// quick succession left it with no active cell (the coordinator told the
/// old active to rebuild twice, judging by a status from before its first
/// request; a forced failover saw the first copy complete, committed the
/// change of active, and the promotion was refused; the next pass demoted
/// the old active). All four failed with both fixes reverted (a rebuild
/// request for a copy already taken changes nothing; the old active is kept
/// until its successor serves) and pass with either one.
#[test]
fn seeds_40608_63531_90470_and_96076_keep_an_active_cell_after_two_operator_actions() {
    for seed in [40608, 63531, 90470, 96076] {
        let result = run_seed(seed, &Faults::all(), false);
        assert!(result.violation.is_none(), "seed {seed}: {}", result.violation.unwrap());
        let actions = result.stats.switchovers + result.stats.forced_failovers + result.stats.operator_refused;
        assert!(actions >= 2, "seed {seed} no longer draws two operator actions: it tests nothing");
    }
}

#[test]
fn forced_failovers_of_a_degraded_pair_lose_only_what_they_report() {
    let plan = scenario("forced-failover-of-a-degraded-pair").expect("a known scenario");
    let summary = sweep_plans(1, 100, &Faults::all(), Some(&plan), 2, 0, &|_| {});
    let failing: Vec<String> =
        summary.failures.iter().map(|f| format!("seed {}: {}", f.seed, f.violation.as_ref().unwrap())).collect();
    assert!(
        failing.is_empty(),
        "replay with `cellbank sim --scenario forced-failover-of-a-degraded-pair --seed N`:\n{}",
        failing.join("\n")
    );
    assert!(summary.stats.forced_failovers >= 50, "only {} forced failovers", summary.stats.forced_failovers);
    assert!(summary.stats.forfeited > 0, "no forced failover lost anything: the loss windows were never tested");
}
