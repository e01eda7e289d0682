require "fileinto";
if header :is "x-nothing" "" { fileinto "Empty"; } else { fileinto "NoHeader"; }
