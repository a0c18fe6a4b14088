"""Example LiveKit agents that drive a talkingmachines avatar: a voice agent and an offline echo agent."""
