"""Deployment assets of talkingmachines; only the example agents (deploy.agent) are Python."""
