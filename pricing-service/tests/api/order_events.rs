//! `order.placed` counts units sold, once per message ID.

use shared::events::{EventLine, OrderPlaced};
use shared::money::Money;
use uuid::Uuid;

use crate::helpers::{assert_eventually, spawn_app_with};

fn placed(lines: &[(&str, u32)]) -> OrderPlaced {
    OrderPlaced {
        order_id: Uuid::new_v4(),
        lines: lines
            .iter()
            .map(|&(sku, qty)| EventLine {
                sku: sku.to_owned(),
                qty,
                reservation_id: Uuid::new_v4(),
                unit_price: Money(100),
            })
            .collect(),
        total: Money(0),
        currency: "EUR".to_owned(),
    }
}

#[tokio::test]
async fn order_placed_adds_units_sold_once_per_message_id() {
    // One delivery at a time: the queue is handled in publishing order, so the marker message
    // taking effect proves the two deliveries before it were handled.
    let app = spawn_app_with(|settings| settings.messaging.prefetch = 1).await;
    let message_id = Uuid::new_v4();
    let order = placed(&[("BK-12", 2), ("MG-07", 1)]);

    app.publish(message_id, &order).await;
    app.publish(message_id, &order).await;
    app.publish(Uuid::new_v4(), &placed(&[("ST-01", 1)])).await;
    assert_eventually("the marker order is counted", || async {
        app.price("ST-01").await["unitsSold"] == 1
    })
    .await;

    assert_eq!(app.price("BK-12").await["unitsSold"], 2);
    assert_eq!(app.price("MG-07").await["unitsSold"], 1);
    app.teardown().await;
}

#[tokio::test]
async fn separate_orders_add_up() {
    let app = spawn_app_with(|_| {}).await;

    app.publish(Uuid::new_v4(), &placed(&[("TS-33", 2)])).await;
    app.publish(Uuid::new_v4(), &placed(&[("TS-33", 3), ("UNKNOWN-9", 1)]))
        .await;

    assert_eventually("both orders are counted", || async {
        app.price("TS-33").await["unitsSold"] == 5
    })
    .await;
    app.teardown().await;
}
