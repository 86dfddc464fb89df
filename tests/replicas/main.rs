//! Several replicas of every stateful service are correct together: two **release processes**
//! each of pricing, inventory and order-service, each service on a PostgreSQL database of its
//! own shared by its replicas, behind one gateway that balances across them, while one replica
//! of each service is killed with `SIGKILL` and started again in the middle of the load.
//!
//! Every order carries an `Idempotency-Key` and is sent again with the same key after a pause
//! until it is answered `201` (as a client told `503` would). Then:
//!
//! - every key that got a `201` names one stored order, readable from either order replica;
//! - stock: units taken off hand = orders placed (no reservation committed twice, whichever
//!   replica took or committed it), nothing left reserved (the sweepers of both replicas returned
//!   every failed attempt's reservation, none twice);
//! - pricing counted the same number of units sold (every `order.placed` applied exactly once,
//!   although the two pricing replicas compete for the queue and one died holding deliveries);
//! - no outbox row is left unsent (the relay's leader died with one order replica; the other
//!   took over), and every consumer queue and DLQ is empty.
//!
//! A second, crash-free round sells the last units of a product: 300 orders of one unit each
//! against 100 on hand, through both replicas at once: exactly 100 are placed and the rest are
//! refused `409`, so two replicas never both see "enough stock".
//!
//! It needs `cargo build --release` and PostgreSQL at `PG_URL` (default the development server
//! on 127.0.0.1:5432), so `cargo test --workspace` skips it (ignored); `.ci/run` runs it:
//!
//! ```text
//! cargo build --release && cargo test -p e2e --test replicas -- --ignored --nocapture
//! ```

#[path = "../trace/stack.rs"]
#[allow(dead_code)] // the trace test's broker proxy is not used here
mod stack;

#[path = "../crash/orders.rs"]
mod orders;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use orders::{
    assert_eventually_drained, get_json, metric, place, place_until_answered, unreadable_orders,
};
use serde_json::json;
use shared::testing::postgres::TestDatabase;
use stack::{Layout, Stack, amqp_url};
use tokio::time::Instant;

/// At least 2,000 orders in flight across the replicas: at a few hundred per second on two cores
/// that is 10-20 s of load, long enough for three crashes to land in the middle of it.
const ORDERS: usize = 3_000;
/// Clients in flight at once.
const CONCURRENCY: usize = 64;
/// Processes of each stateful service.
const REPLICAS: usize = 2;
/// Which replica dies after how many answered orders, one service at a time so each crash is
/// felt on its own.
const CRASHES: [(&str, usize); 3] = [
    ("inventory-1", 600),
    ("order-1", 1_200),
    ("pricing-1", 1_800),
];
/// How long a killed replica stays dead: long enough that callers' attempts to it fail and its
/// in-flight deliveries go back to the queue.
const DEAD_FOR: Duration = Duration::from_secs(2);
/// Reservations of failed attempts expire after this (inventory's `RESERVATION_TTL_MS`, ten
/// minutes in production), so the test can see the sweepers return them.
const RESERVATION_TTL_MS: &str = "3000";
/// Units on hand of the product the crash round orders: more than it can take.
const ON_HAND: i64 = 1_000_000;
/// The product of the last-units round, and its stock.
const SCARCE_SKU: &str = "MG-07";
const SCARCE_UNITS: i64 = 100;
const SCARCE_ORDERS: usize = 300;
/// The whole scenario's bound: about a minute; ten only expires when something hangs.
const SCENARIO_WITHIN: Duration = Duration::from_secs(600);
/// How long the system may take to settle after the load (expiry, relay, consumers).
const SETTLE_WITHIN: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the release binaries on PostgreSQL: cargo build --release, then run with --ignored"]
async fn two_replicas_of_each_service_lose_nothing_and_apply_nothing_twice_while_one_of_each_is_killed()
 {
    tokio::time::timeout(SCENARIO_WITHIN, scenario())
        .await
        .expect("the scenario finished in time");
}

async fn scenario() {
    let (pricing_db, inventory_db, order_db) = tokio::join!(
        TestDatabase::create(),
        TestDatabase::create(),
        TestDatabase::create()
    );
    let database_of = |service: &str| -> String {
        match service {
            "pricing" => pricing_db.url(),
            "inventory" => inventory_db.url(),
            _ => order_db.url(),
        }
        .to_owned()
    };
    let amqp = amqp_url();
    let mut stack = Stack::start_layout(Layout {
        otlp: None,
        order_amqp_url: &amqp,
        replicas: REPLICAS,
        postgres: Some(&database_of),
        extra: &[
            ("inventory", "RESERVATION_TTL_MS", RESERVATION_TTL_MS),
            // One client (this test) sends every order: the per-client limit is not under test.
            ("gateway", "RATE_LIMIT_PER_SECOND", "0"),
        ],
    })
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client");
    // Replicas keep their ports across restarts.
    let base =
        |service: &str, replica: usize| stack.service(&format!("{service}-{replica}")).url("");
    let inventory: Vec<String> = (1..=REPLICAS).map(|r| base("inventory", r)).collect();
    let pricing: Vec<String> = (1..=REPLICAS).map(|r| base("pricing", r)).collect();
    let order: Vec<String> = (1..=REPLICAS).map(|r| base("order", r)).collect();
    for (sku, units) in [("BK-12", ON_HAND), (SCARCE_SKU, SCARCE_UNITS)] {
        let response = http
            .put(format!("{}/stock/{sku}", inventory[0]))
            .json(&json!({"onHand": units}))
            .send()
            .await
            .expect("inventory answers");
        assert!(
            response.status().is_success(),
            "restock {sku}: {}",
            response.status()
        );
    }
    let sold_before = orders::units_sold(&http, &pricing[1], "BK-12").await;

    // The crash round.
    let orders_url = stack.service("gateway").url("/api/orders");
    let keys: Vec<String> = (0..ORDERS)
        .map(|i| format!("replicas-{i}-{}", uuid::Uuid::new_v4()))
        .collect();
    let answered = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let load = {
        let (http, orders_url, answered) = (http.clone(), orders_url.clone(), answered.clone());
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
    for (replica, after) in CRASHES {
        while answered.load(Ordering::SeqCst) < after {
            assert!(
                !load.is_finished(),
                "the load ended before {replica} was killed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stack.kill(replica);
        println!(
            "{replica} killed after {} answers, {:?} into the load",
            answered.load(Ordering::SeqCst),
            started.elapsed()
        );
        tokio::time::sleep(DEAD_FOR).await;
        stack.restart(replica).await;
        println!("{replica} ready again after {:?}", started.elapsed());
    }
    let outcomes = load.await.expect("the load ran");
    println!("{ORDERS} orders placed in {:?}", started.elapsed());
    let mut statuses = BTreeMap::<String, usize>::new();
    let mut ids = HashSet::new();
    for (_, id, answers) in &outcomes {
        for answer in answers {
            *statuses.entry(answer.clone()).or_default() += 1;
        }
        ids.insert(id.clone());
    }
    println!("answers, resends included: {statuses:?}");
    assert_eq!(ids.len(), ORDERS, "each key names its own order");

    // Every order is stored once, and both order replicas read it.
    for (replica, base) in order.iter().enumerate() {
        let orders_url = format!("{base}/orders/");
        let missing = unreadable_orders(
            &http,
            &orders_url,
            ids.iter().map(String::as_str),
            CONCURRENCY,
        )
        .await;
        assert_eq!(missing, 0, "order-{} reads every placed order", replica + 1);
    }

    // Units taken = orders placed = units counted sold, nothing reserved, nothing unsent.
    let expected = i64::try_from(ORDERS).expect("fits");
    let deadline = Instant::now() + SETTLE_WITHIN;
    loop {
        let stock = get_json(&http, &format!("{}/stock/BK-12", inventory[1])).await;
        let taken = ON_HAND - stock["onHand"].as_i64().unwrap_or(-1);
        let reserved = stock["reserved"].as_i64().unwrap_or(-1);
        let sold = orders::units_sold(&http, &pricing[0], "BK-12").await - sold_before;
        let mut unsent = 0.0;
        for replica in 1..=REPLICAS {
            let base = stack.service(&format!("order-{replica}")).url("");
            unsent += metric(&http, &base, "outbox_pending_rows")
                .await
                .unwrap_or(-1.0);
        }
        if taken == expected && reserved == 0 && sold == expected && unsent == 0.0 {
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
             {reserved} still reserved, {unsent} outbox rows unsent\ninventory-1 log:\n{}",
            stack::tail(&stack.service("inventory-1").log)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eventually_drained(&stack.namespace).await;

    // The last units, through both replicas at once.
    let outcomes: Vec<String> = futures::stream::iter(0..SCARCE_ORDERS)
        .map(|i| {
            let (http, url) = (http.clone(), orders_url.clone());
            async move {
                let key = format!("scarce-{i}-{}", uuid::Uuid::new_v4());
                let body = json!({"items": [{"sku": SCARCE_SKU, "qty": 1}]});
                place(&http, &url, &key, &body).await.label()
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut counts = BTreeMap::<String, usize>::new();
    for status in outcomes {
        *counts.entry(status).or_default() += 1;
    }
    println!("last {SCARCE_UNITS} units, {SCARCE_ORDERS} orders: {counts:?}");
    // Inventory commits each placed order's reservation when its `order.placed` arrives.
    let deadline = Instant::now() + SETTLE_WITHIN;
    let stock = loop {
        let stock = get_json(&http, &format!("{}/stock/{SCARCE_SKU}", inventory[0])).await;
        if stock["reserved"].as_i64() == Some(0) || Instant::now() > deadline {
            break stock;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        counts.get("201").copied().unwrap_or(0),
        usize::try_from(SCARCE_UNITS).expect("fits"),
        "exactly the units on hand were sold: {counts:?}, stock {stock}"
    );
    assert_eq!(
        counts.get("409").copied().unwrap_or(0),
        SCARCE_ORDERS - usize::try_from(SCARCE_UNITS).expect("fits"),
        "every other order was refused for stock: {counts:?}"
    );
    assert_eq!(stock["onHand"].as_i64(), Some(0), "stock {stock}");
    assert_eq!(stock["reserved"].as_i64(), Some(0), "stock {stock}");

    stack.terminate().await;
    stack.cleanup().await;
    drop((pricing_db, inventory_db, order_db));
}
