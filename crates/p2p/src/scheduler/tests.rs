use super::*;

fn task() -> String {
    BlobDigest::of(b"blob").to_string()
}

/// A blob of three pieces.
const SIZE: u64 = 3 * PIECE_SIZE;

fn state() -> (SchedulerState, Instant) {
    (
        SchedulerState::new(SchedulerPolicy::default()),
        Instant::now(),
    )
}

fn register(s: &mut SchedulerState, now: Instant, id: &str, seed: bool, labels: &[(&str, &str)]) {
    s.register(
        RegisterRequest {
            peer_id: id.into(),
            data_addr: format!("{id}:1"),
            upload_capacity: 2,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            seed,
            active_uploads: 0,
        },
        now,
    );
}

fn schedule(s: &mut SchedulerState, now: Instant, id: &str) -> ScheduleResponse {
    let request = ScheduleRequest {
        peer_id: id.into(),
        task: task(),
        size: SIZE,
    };
    s.schedule(&request, now).unwrap()
}

fn report(s: &mut SchedulerState, now: Instant, id: &str, pieces: &[usize], digests: bool) {
    let mut have = Bitmap::new(3);
    pieces.iter().for_each(|i| have.set(*i));
    let piece_digests = (0..3)
        .map(|i| {
            if digests && have.get(i) {
                BlobDigest::of(&[i as u8]).to_string()
            } else {
                String::new()
            }
        })
        .collect();
    s.report(
        ReportRequest {
            peer_id: id.into(),
            task: task(),
            size: SIZE,
            piece_size: PIECE_SIZE,
            have: have.wire().to_vec(),
            complete: have.is_full(),
            piece_digests,
            chain_states: Vec::new(),
        },
        now,
    )
    .unwrap();
}

fn bad_peer(s: &mut SchedulerState, now: Instant, reporter: &str, peer: &str) {
    s.report_bad_peer(
        &BadPeerRequest {
            reporter_id: reporter.into(),
            peer_id: peer.into(),
            task: task(),
            piece: 1,
        },
        now,
    )
    .unwrap();
}

fn parent_ids(answer: &ScheduleResponse) -> Vec<&str> {
    answer.parents.iter().map(|p| p.peer_id.as_str()).collect()
}

#[test]
fn one_peer_goes_to_the_origin_and_the_others_wait_then_fetch_from_it() {
    let (mut s, now) = state();
    for id in ["a", "b"] {
        register(&mut s, now, id, false, &[]);
    }
    assert_eq!(schedule(&mut s, now, "a").decision(), Decision::Origin);
    assert_eq!(schedule(&mut s, now, "a").decision(), Decision::Origin);
    assert_eq!(schedule(&mut s, now, "b").decision(), Decision::Wait);
    // Pieces without digests from the origin are of no use yet.
    report(&mut s, now, "a", &[0], false);
    assert_eq!(schedule(&mut s, now, "b").decision(), Decision::Wait);
    report(&mut s, now, "a", &[0], true);
    let answer = schedule(&mut s, now, "b");
    assert_eq!(answer.decision(), Decision::Parents);
    assert_eq!(parent_ids(&answer), ["a"]);
    assert_eq!(answer.piece_digests[0], BlobDigest::of(&[0]).to_string());
    assert_eq!(answer.piece_digests[1], "");
}

#[test]
fn ordinary_peers_send_a_seed_to_the_origin() {
    let (mut s, now) = state();
    register(&mut s, now, "seed", true, &[]);
    register(&mut s, now, "a", false, &[]);
    register(&mut s, now, "b", false, &[]);
    let answer = schedule(&mut s, now, "a");
    assert_eq!(answer.decision(), Decision::Seed);
    assert_eq!(answer.parents[0].data_addr, "seed:1");
    assert_eq!(schedule(&mut s, now, "seed").decision(), Decision::Origin);
    assert_eq!(schedule(&mut s, now, "b").decision(), Decision::Wait);
}

#[test]
fn only_the_origin_fetcher_or_a_complete_peer_sets_piece_digests() {
    let (mut s, now) = state();
    for id in ["a", "b", "c"] {
        register(&mut s, now, id, false, &[]);
    }
    assert_eq!(schedule(&mut s, now, "a").decision(), Decision::Origin);
    // b claims digests while holding part of the blob: ignored.
    report(&mut s, now, "b", &[1], true);
    assert_eq!(schedule(&mut s, now, "c").decision(), Decision::Wait);
    // a, fetching from the origin, is believed.
    report(&mut s, now, "a", &[1], true);
    assert_eq!(parent_ids(&schedule(&mut s, now, "c")).len(), 2);
}

#[test]
fn a_reported_peer_is_not_offered_to_its_reporter_nor_when_others_can_serve() {
    let (mut s, now) = state();
    for id in ["a", "b", "c"] {
        register(&mut s, now, id, false, &[]);
    }
    schedule(&mut s, now, "a");
    report(&mut s, now, "a", &[0, 1, 2], true);
    bad_peer(&mut s, now, "b", "a");
    assert_eq!(schedule(&mut s, now, "b").decision(), Decision::Origin);
    // Registering again does not clear the block.
    register(&mut s, now, "a", false, &[]);
    report(&mut s, now, "b", &[0], false);
    let answer = schedule(&mut s, now, "c");
    assert_eq!(parent_ids(&answer), ["b"]);
}

#[test]
fn silent_peers_expire() {
    let (mut s, now) = state();
    register(&mut s, now, "a", false, &[]);
    schedule(&mut s, now, "a");
    report(&mut s, now, "a", &[0, 1, 2], true);
    let later = now + SchedulerPolicy::default().keepalive * 4;
    register(&mut s, later, "b", false, &[]);
    // a is gone: b gets the origin slot a held.
    assert_eq!(schedule(&mut s, later, "b").decision(), Decision::Origin);
    let status = s
        .report(
            ReportRequest {
                peer_id: "a".into(),
                task: task(),
                size: SIZE,
                piece_size: PIECE_SIZE,
                ..Default::default()
            },
            later,
        )
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
}

#[test]
fn parents_are_chosen_by_free_capacity_and_locality_and_load_spreads() {
    let policy = SchedulerPolicy {
        max_parents: 1,
        ..SchedulerPolicy::default()
    };
    let (mut s, now) = (SchedulerState::new(policy), Instant::now());
    register(&mut s, now, "near", false, &[("zone", "z1")]);
    register(&mut s, now, "far", false, &[("zone", "z2")]);
    register(&mut s, now, "x", false, &[("zone", "z1")]);
    for id in ["near", "far"] {
        report(&mut s, now, id, &[0, 1, 2], true);
    }
    // "near" shares x's zone; each answer takes one of its two slots.
    assert_eq!(parent_ids(&schedule(&mut s, now, "x"))[0], "near");
    assert_eq!(parent_ids(&schedule(&mut s, now, "x"))[0], "near");
    assert_eq!(parent_ids(&schedule(&mut s, now, "x"))[0], "far");
}

#[test]
fn requests_from_strangers_or_with_bad_digests_are_refused() {
    let (mut s, now) = state();
    let request = ScheduleRequest {
        peer_id: "nobody".into(),
        task: task(),
        size: 1,
    };
    assert_eq!(
        s.schedule(&request, now).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    register(&mut s, now, "a", false, &[]);
    let request = ScheduleRequest {
        peer_id: "a".into(),
        task: "sha256:../../etc".into(),
        size: 1,
    };
    assert_eq!(
        s.schedule(&request, now).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
}

#[test]
fn one_report_cannot_shut_a_peer_out_but_two_reporters_block_it_until_reports_expire() {
    let (mut s, now) = state();
    for id in ["a", "b", "c", "d"] {
        register(&mut s, now, id, false, &[]);
    }
    schedule(&mut s, now, "a");
    report(&mut s, now, "a", &[0, 1, 2], true);
    bad_peer(&mut s, now, "b", "a");
    // a is the only holder: c is still sent to it, b is not.
    assert_eq!(parent_ids(&schedule(&mut s, now, "c")), ["a"]);
    assert_ne!(schedule(&mut s, now, "b").decision(), Decision::Parents);
    // Reports by one reporter count once; a second reporter blocks a.
    bad_peer(&mut s, now, "b", "a");
    assert_eq!(s.status(now).peers[0].reporters, 1);
    bad_peer(&mut s, now, "c", "a");
    let status = s.status(now);
    assert!(status.peers[0].blocked && status.peers[0].reporters == 2);
    assert_ne!(schedule(&mut s, now, "d").decision(), Decision::Parents);
    // Reports expire (keepalives keep everyone registered meanwhile).
    let later = now + SchedulerPolicy::default().report_ttl + Duration::from_secs(1);
    for id in ["a", "b", "c", "d"] {
        register(&mut s, later, id, false, &[]);
    }
    assert_eq!(parent_ids(&schedule(&mut s, later, "d")), ["a"]);
    assert!(!s.status(later).peers[0].blocked);
    assert_eq!(s.status(later).bad_peer_reports, 3);
}

#[test]
fn reports_from_strangers_or_about_oneself_do_not_count() {
    let (mut s, now) = state();
    register(&mut s, now, "a", false, &[]);
    let request = |reporter: &str| BadPeerRequest {
        reporter_id: reporter.into(),
        peer_id: "a".into(),
        task: task(),
        piece: 0,
    };
    assert!(s.report_bad_peer(&request("stranger"), now).is_err());
    s.report_bad_peer(&request("a"), now).unwrap();
    assert_eq!(s.status(now).peers[0].reporters, 0);
}
