"""What the agent knows of the cluster in Kubernetes mode: slim projections of watched
objects, the opt-in rules, and the indexes the proxy asks (is this IP a meshed pod, is it a
Service VIP). Pure: the watches that feed it live in `agent.controlplane.kube`."""
