"""Courier's Helm chart (charts/courier) and the offline checks that stand in for a cluster."""
