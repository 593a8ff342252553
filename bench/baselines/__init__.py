"""What a team would write instead of the bridge, run on the same fakes for comparison."""
