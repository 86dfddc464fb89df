//! Nothing is lost when inventory crashes under load: thousands of orders through the four
//! **release binaries** (separate processes, SQLite files, the real broker) while inventory is
//! killed with `SIGKILL` and started again in the middle of the load.
//!
//! Every order carries an `Idempotency-Key`. An order that did not get its `201` (inventory was
//! away, a deadline passed) is sent again with the same key after a pause, as a client that was
//! told `503` would, until it is answered `201` (or refused for good, which fails the test). Then,
//! after the reservations of the attempts that failed have expired:
//!
//! - every key that got a `201` names one stored order, and no two keys the same order;
//! - stock: units taken off hand = orders placed (no reservation committed twice), nothing left
//!   reserved (no reservation leaked);
//! - pricing counted the same number of units sold (every `order.placed` applied exactly once);
//! - order-service's outbox has no row left unsent, and every consumer queue and DLQ is empty.
//!
//! It needs `cargo build --release` first, so `cargo test --workspace` skips it (ignored);
//! `.ci/run` runs it after the release build:
//!
//! ```text
//! cargo build --release && cargo test -p e2e --test crash -- --ignored --nocapture
//! ```

#[path = "../trace/stack.rs"]
#[allow(dead_code)] // the trace test's broker proxy is not used here
mod stack;

mod orders;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use orders::{
    assert_eventually_drained, get_json, metric, place_until_answered, units_sold,
    unreadable_orders,
};
use serde_json::json;
use stack::{Stack, amqp_url};
use tokio::time::Instant;

/// At least 5,000 orders, as the order-path issue asks: at a few hundred per second on two cores
/// that is 10-30 s of load, long enough that the crash lands in the middle of it.
const ORDERS: usize = 5_000;
/// Clients in flight at once: enough to keep every service busy (the benchmark's 16-64), few
/// enough that a debug-built test client is not what limits the rate.
const CONCURRENCY: usize = 32;
/// Inventory is killed once this many orders have been placed.
const KILL_AFTER: usize = 1_500;
/// How long inventory stays dead: long enough for order-service's calls to fail and its breaker
/// to open, so the failure path is exercised too, not only a blip.
const DEAD_FOR: Duration = Duration::from_secs(2);
/// Reservations of orders that failed expire after this (inventory's `RESERVATION_TTL_MS`); the
/// test waits for the sweeper to return them, so it is short here (ten minutes in production).
const RESERVATION_TTL_MS: &str = "3000";
/// Units on hand at the start: more than the orders can take, so no order is refused for stock.
const ON_HAND: i64 = 1_000_000;
/// The whole scenario's bound: it takes about a minute; ten only expires when something hangs.
const SCENARIO_WITHIN: Duration = Duration::from_secs(600);
/// How long the system may take to settle after the load (expiry, the relay, the consumers):
/// the TTL plus the sweep interval plus the relay's longest backoff, with a wide margin.
const SETTLE_WITHIN: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the release binaries: cargo build --release, then run with --ignored"]
async fn orders_survive_inventory_being_killed_under_load_with_nothing_lost_or_applied_twice() {
    tokio::time::timeout(SCENARIO_WITHIN, scenario())
        .await
        .expect("the scenario finished in time");
}

async fn scenario() {
    let mut stack = Stack::start_with(
        None,
        &amqp_url(),
        &[
            ("inventory", "RESERVATION_TTL_MS", RESERVATION_TTL_MS),
            // One client (this test) sends every order: the per-client limit is not under test.
            ("gateway", "RATE_LIMIT_PER_SECOND", "0"),
        ],
    )
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client");
    let stock_url = stack.service("inventory").url("/stock/BK-12");
    let response = http
        .put(&stock_url)
        .json(&json!({"onHand": ON_HAND}))
        .send()
        .await
        .expect("inventory answers");
    assert!(
        response.status().is_success(),
        "restock: {}",
        response.status()
    );
    let sold_before = units_sold(&http, &stack.service("pricing").url(""), "BK-12").await;

    // The load, with inventory killed once KILL_AFTER orders have been answered.
    let orders_url = stack.service("gateway").url("/api/orders");
    let keys: Vec<String> = (0..ORDERS)
        .map(|i| format!("crash-{i}-{}", uuid::Uuid::new_v4()))
        .collect();
    let answered = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let load = {
        let (http, orders_url, answered) = (http.clone(), orders_url.clone(), answered.clone());
        let keys = keys.clone();
        tokio::spawn(async move {
            futures::stream::iter(keys)
                .map(|key| {
                    let (http, orders_url, answered) =
                        (http.clone(), orders_url.clone(), answered.clone());
                    async move {
                        let (id, answers) = place_until_answered(&http, &orders_url, &key).await;
                        answered.fetch_add(1, Ordering::SeqCst);
                        (key, id, answers)
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect::<Vec<_>>()
                .await
        })
    };
    while answered.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(!load.is_finished(), "the load ended before the crash");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack.kill("inventory");
    println!(
        "inventory killed after {} answers, {:?} into the load",
        answered.load(Ordering::SeqCst),
        started.elapsed()
    );
    tokio::time::sleep(DEAD_FOR).await;
    stack.restart("inventory").await;
    println!("inventory ready again after {:?}", started.elapsed());
    let outcomes = load.await.expect("the load ran");
    println!("{ORDERS} orders placed in {:?}", started.elapsed());
    let mut placed: Vec<(String, String)> = Vec::new();
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for (key, id, answers) in outcomes {
        for answer in answers {
            *statuses.entry(answer).or_default() += 1;
        }
        placed.push((key, id));
    }
    println!("answers, resends included: {statuses:?}");
    assert!(
        statuses.keys().any(|status| status != "201"),
        "the crash was felt by some orders (else it did not land in the load)"
    );

    // Every 201 is one stored order, and no two keys share one.
    let ids: HashSet<&str> = placed.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids.len(), placed.len(), "each key names its own order");
    let order_base = stack.service("order").url("/orders/");
    let missing = unreadable_orders(&http, &order_base, ids.iter().copied(), CONCURRENCY).await;
    assert_eq!(missing, 0, "every placed order is stored");

    // Once the failed orders' reservations have expired and both consumers caught up: units
    // taken = orders placed = units counted sold, nothing reserved, nothing left to send.
    let expected = i64::try_from(ORDERS).expect("fits");
    let deadline = Instant::now() + SETTLE_WITHIN;
    loop {
        let stock = get_json(&http, &stock_url).await;
        let taken = ON_HAND - stock["onHand"].as_i64().unwrap_or(-1);
        let reserved = stock["reserved"].as_i64().unwrap_or(-1);
        let sold =
            units_sold(&http, &stack.service("pricing").url(""), "BK-12").await - sold_before;
        let unsent = metric(
            &http,
            &stack.service("order").url(""),
            "outbox_pending_rows",
        )
        .await;
        let settled = taken == expected && reserved == 0 && sold == expected && unsent == Some(0.0);
        if settled {
            println!(
                "settled after {:?}: {taken} units taken, {sold} sold, 0 reserved, 0 unsent",
                started.elapsed()
            );
            break;
        }
        assert!(
            taken <= expected && sold <= expected,
            "applied more than once: {taken} units taken and {sold} counted sold for {expected} orders"
        );
        assert!(
            Instant::now() < deadline,
            "not settled within {SETTLE_WITHIN:?}: {taken} of {expected} units taken, {sold} sold, \
             {reserved} still reserved, {unsent:?} outbox rows unsent\ninventory log:\n{}",
            stack::tail(&stack.service("inventory").log)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eventually_drained(&stack.namespace).await;

    stack.terminate().await;
    stack.cleanup().await;
}
