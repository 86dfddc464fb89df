-- One database per stateful service, as in the cluster: a service owns its data, and nothing
-- joins across them. The official image runs this once, when the data volume is first created.
-- Each service applies its own migrations (serialised across replicas by the migrator's lock).
CREATE DATABASE pricing;
CREATE DATABASE inventory;
CREATE DATABASE "order";
