//! Three instances behind one name: discovery, power of two choices, ejection, re-resolution.

use std::time::Duration;

use shared::client::{ClientRequest, ResilientClient};

use crate::helpers::{
    Behaviour, TestInstance, TestResolver, client, instance_addresses, jump_clock, named_config,
};

struct Three {
    instances: Vec<TestInstance>,
    resolver: TestResolver,
    port: u16,
}

async fn three_instances() -> Three {
    let addrs = instance_addresses(3);
    let mut instances = Vec::new();
    for addr in &addrs {
        instances.push(TestInstance::start(*addr, Behaviour::Healthy).await);
    }
    let resolver = TestResolver::default();
    resolver.set(&addrs);
    Three {
        instances,
        resolver,
        port: addrs[0].port(),
    }
}

async fn calls(client: &ResilientClient, count: usize) {
    for _ in 0..count {
        client
            .send(ClientRequest::get("/stock/BK-12"))
            .await
            .expect("every call succeeds");
    }
}

/// `callers` concurrent callers making `each` calls, every one of which must succeed.
async fn concurrent_calls(client: &ResilientClient, callers: usize, each: usize) {
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { calls(&client, each).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("caller");
    }
}

fn failures_of(client: &ResilientClient, instance: &TestInstance) -> u64 {
    let check = client.health_check();
    let address = instance.addr.to_string();
    check.detail["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|i| i["address"] == address.as_str())
        .map_or(0, |i| i["failures"].as_u64().expect("a count"))
}

#[tokio::test]
async fn traffic_spreads_over_every_address_behind_the_name() {
    let three = three_instances().await;
    let client = client(named_config(&three.resolver, three.port));

    // Eight callers at once, so the instances' in-flight counts take part in the choice.
    concurrent_calls(&client, 8, 30).await;

    let shares: Vec<usize> = three.instances.iter().map(TestInstance::requests).collect();
    assert_eq!(shares.iter().sum::<usize>(), 240);
    assert!(shares.iter().all(|s| *s >= 24), "{shares:?}");
    let check = client.health_check();
    assert_eq!(check.detail["instances"].as_array().expect("list").len(), 3);
}

#[tokio::test]
async fn a_killed_instance_is_ejected_after_its_failures_and_callers_see_no_error() {
    let three = three_instances().await;
    let client = client(named_config(&three.resolver, three.port));
    concurrent_calls(&client, 8, 10).await;

    three.instances[2].kill();
    // Its refused connections are retried on the others, so no call fails, and after five
    // failures in a row it is left out. (Concurrent callers, so the balancer samples every
    // instance; with a single caller the slowest of three may never be chosen at all.)
    let mut rounds = 0;
    while failures_of(&client, &three.instances[2]) < 5 {
        assert!(rounds < 50, "the killed instance was never ejected");
        concurrent_calls(&client, 8, 5).await;
        rounds += 1;
    }
    let (failures, requests) = (
        failures_of(&client, &three.instances[2]),
        three.instances[2].requests(),
    );
    // Five, or a few more when attempts already running on it failed after the fifth.
    assert!((5..=8).contains(&failures), "{failures}");
    concurrent_calls(&client, 8, 25).await;

    assert_eq!(failures_of(&client, &three.instances[2]), failures);
    assert_eq!(three.instances[2].requests(), requests);
    let check = client.health_check();
    let ejected: Vec<_> = check.detail["instances"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|i| i["state"] == "ejected")
        .map(|i| i["address"].clone())
        .collect();
    assert_eq!(ejected, [three.instances[2].addr.to_string()]);
    assert!(check.ok, "one ejected instance does not open the breaker");
}

#[tokio::test]
async fn an_ejected_instance_that_comes_back_is_probed_and_used_again() {
    let mut three = three_instances().await;
    let client = client(named_config(&three.resolver, three.port));
    let addr = three.instances[2].addr;
    three.instances[2].kill();
    let mut rounds = 0;
    while failures_of(&client, &three.instances[2]) < 5 {
        assert!(rounds < 50, "the killed instance was never ejected");
        concurrent_calls(&client, 8, 5).await;
        rounds += 1;
    }

    // Back on the same address; once the ejection has run out, an attempt goes to it again.
    three.instances[2] = TestInstance::start(addr, Behaviour::Healthy).await;
    calls(&client, 20).await;
    assert_eq!(three.instances[2].requests(), 0, "still ejected");
    jump_clock(shared::client::BalanceConfig::default().ejection_time).await;
    let mut calls_made = 0;
    while three.instances[2].requests() == 0 {
        assert!(calls_made < 50, "the instance was never probed");
        concurrent_calls(&client, 8, 1).await;
        calls_made += 1;
    }
    let check = client.health_check();
    let state = check.detail["instances"]
        .as_array()
        .expect("list")
        .iter()
        .find(|i| i["address"] == addr.to_string().as_str())
        .map(|i| i["state"].clone());
    assert_eq!(state, Some("eligible".into()));
}

#[tokio::test]
async fn a_hanging_instance_gets_no_more_than_the_attempts_that_eject_it() {
    let three = three_instances().await;
    let mut config = named_config(&three.resolver, three.port);
    config.attempt_timeout = Duration::from_millis(200);
    let client = client(config);
    calls(&client, 30).await;

    let others = |three: &Three| three.instances[0].requests() + three.instances[2].requests();
    three.instances[1].behave(Behaviour::Hanging);
    let (before, others_before) = (three.instances[1].requests(), others(&three));
    concurrent_calls(&client, 8, 12).await;

    // Each attempt it swallows runs the 200 ms attempt timeout and is retried elsewhere; while
    // it holds attempts its load (latency × in flight) rises, so the balancer turns away from it,
    // and five failures in a row eject it. Eight callers may each have sent it one attempt before
    // the first timed out.
    let swallowed = three.instances[1].requests() - before;
    assert!((1..=8).contains(&swallowed), "{swallowed}");
    assert_eq!(others(&three) - others_before, 96);
}

#[tokio::test]
async fn an_instance_that_appears_gets_traffic_after_the_next_resolution() {
    let addrs = instance_addresses(2);
    let first = TestInstance::start(addrs[0], Behaviour::Healthy).await;
    let resolver = TestResolver::default();
    resolver.set(&addrs[..1]);
    let client = client(named_config(&resolver, addrs[0].port()));
    calls(&client, 10).await;
    assert_eq!(first.requests(), 10);

    let second = TestInstance::start(addrs[1], Behaviour::Healthy).await;
    resolver.set(&addrs);
    calls(&client, 10).await;
    assert_eq!(second.requests(), 0, "not before the set is resolved again");

    // Once the resolution is older than `resolve_every`, the next call refreshes it in the
    // background; the calls after it see both instances.
    jump_clock(shared::client::BalanceConfig::default().resolve_every).await;
    let mut calls_made = 0;
    while second.requests() == 0 {
        assert!(calls_made < 200, "the new instance never got traffic");
        calls(&client, 1).await;
        calls_made += 1;
    }

    // And one that vanishes from the name is drained: no new attempts go to it.
    resolver.set(&addrs[1..]);
    jump_clock(shared::client::BalanceConfig::default().resolve_every).await;
    calls(&client, 1).await;
    let mut settled = 0;
    while client.health_check().detail["instances"]
        .as_array()
        .expect("list")
        .len()
        != 1
    {
        assert!(settled < 200, "the vanished instance was never dropped");
        calls(&client, 1).await;
        settled += 1;
    }
    let before = first.requests();
    calls(&client, 20).await;
    assert_eq!(first.requests(), before);
}

#[tokio::test]
async fn a_name_that_resolves_to_nothing_yet_fails_the_call_and_is_asked_again_on_the_next() {
    let addr = instance_addresses(1)[0];
    let resolver = TestResolver::default();
    let client = client(named_config(&resolver, addr.port()));

    let error = client
        .send(ClientRequest::get("/stock/BK-12"))
        .await
        .expect_err("no address yet");
    assert!(
        matches!(error, shared::client::ClientError::Connect { .. }),
        "{error:?}"
    );

    // The service came up: the next call finds it without waiting for the interval.
    let instance = TestInstance::start(addr, Behaviour::Healthy).await;
    resolver.set(&[addr]);
    calls(&client, 1).await;
    assert_eq!(instance.requests(), 1);
}

#[tokio::test]
async fn calls_that_find_the_name_unresolved_at_once_share_one_lookup_and_one_bound_per_instance() {
    let addr = instance_addresses(1)[0];
    let instance = TestInstance::start(addr, Behaviour::Slow(Duration::from_millis(50))).await;
    let resolver = TestResolver::default();
    resolver.set(&[addr]);
    let mut config = named_config(&resolver, addr.port());
    config.balance.max_in_flight_per_instance = 2;
    let client = client(config);

    // A cold burst: eight first calls while the name has never been resolved.
    concurrent_calls(&client, 8, 1).await;

    assert_eq!(resolver.lookups(), 1);
    assert_eq!(instance.max_in_flight(), 2);
    let check = client.health_check();
    assert_eq!(check.detail["instances"].as_array().expect("list").len(), 1);
}

#[tokio::test]
async fn an_attempt_still_waiting_for_a_slot_when_a_hedge_wins_does_not_count_against_its_instance()
{
    let addrs = instance_addresses(2);
    let busy = TestInstance::start(addrs[0], Behaviour::Healthy).await;
    let other = TestInstance::start(addrs[1], Behaviour::Slow(Duration::from_millis(300))).await;
    let mut config = crate::helpers::config(&[]);
    config.base_urls = addrs
        .iter()
        .map(|a| format!("http://{a}").parse().expect("url"))
        .collect();
    config.balance.max_in_flight_per_instance = 1;
    config.hedge_delay = Some(Duration::from_millis(50));
    let client = client(config);
    // One caller at a time: the balancer learns that `busy` answers at once and `other` slowly.
    calls(&client, 3).await;
    assert_eq!(failures_of(&client, &busy), 0);

    // A plain POST (never hedged) takes `busy`'s only slot and hangs there.
    busy.behave(Behaviour::Hanging);
    other.behave(Behaviour::Healthy);
    let holder = tokio::spawn({
        let client = client.clone();
        async move {
            let hanging = ClientRequest::post_json("/reserve", &serde_json::json!({}))
                .attempt_timeout(Duration::from_secs(2));
            client.send(hanging).await
        }
    });
    let requests = busy.requests();
    tokio::time::timeout(Duration::from_secs(5), async {
        while busy.requests() == requests {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the POST reaches busy");

    // The next call's first attempt goes to the faster `busy` and waits there for the slot; its
    // hedge on `other` answers. The waiting attempt was never sent: `busy` failed nothing.
    let answered_by_other = other.requests();
    calls(&client, 1).await;
    assert_eq!(other.requests(), answered_by_other + 1);
    assert_eq!(busy.requests(), requests + 1, "only the POST reached busy");
    assert_eq!(failures_of(&client, &busy), 0);
    holder.abort();
}

/// A resolver that never answers, as when the cluster's DNS is down.
struct SilentResolver;

impl shared::client::Resolve for SilentResolver {
    fn resolve(&self, _name: shared::client::Name) -> shared::client::Resolving {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_waiting_for_a_name_that_does_not_resolve_ends_at_its_deadline() {
    let mut config = named_config(&TestResolver::default(), 4002);
    config.resolver = shared::client::Resolver(std::sync::Arc::new(SilentResolver));
    let client = client(config);

    let started = tokio::time::Instant::now();
    let result = shared::deadline::scope(
        shared::deadline::Deadline::after(Duration::from_millis(300)),
        client.send(ClientRequest::get("/stock/BK-12")),
    )
    .await;

    assert!(
        matches!(
            result,
            Err(shared::client::ClientError::DeadlineExceeded { .. })
        ),
        "{result:?}"
    );
    // Not the resolver's own 2 s limit.
    assert_eq!(started.elapsed(), Duration::from_millis(300));
}
