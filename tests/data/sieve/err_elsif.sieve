require "fileinto";
elsif true { keep; }
