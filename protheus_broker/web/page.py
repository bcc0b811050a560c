"""The broker screen's single page: HTML, CSS and JS inline (no CDN), served by the broker.

The script polls ``/api/v1/status`` and ``/api/v1/sessions`` every 2 s and draws the connections
chart as inline SVG.  Actions send ``Authorization: Bearer`` with the token typed into the page
(kept in sessionStorage).  The CSP allows only these exact inline blocks (by hash).
"""

from __future__ import annotations

import base64
import hashlib

CSS = """
:root{--bg:#f6f7f9;--fg:#1d2330;--mut:#667085;--card:#fff;--line:#e3e6eb;--up:#1a7f37;--sus:#b35900;
--down:#c62828;--drain:#5b5bd6}
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;
background:var(--bg);color:var(--fg)}header{background:#1d2330;color:#fff;padding:10px 16px;display:flex;
flex-wrap:wrap;gap:8px 20px;align-items:center}header h1{font-size:18px;margin:0}header .meta{color:#c9cfdb}
main{padding:12px;max-width:1200px;margin:auto}.cards{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:12px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 12px;min-width:110px;flex:1}
.card b{display:block;font-size:20px}.card span{color:var(--mut);font-size:12px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px;margin-bottom:12px}
section h2{font-size:16px;margin:0 0 6px}.sub{color:var(--mut);font-size:12px;margin-bottom:6px}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 6px;border-bottom:1px solid var(--line);white-space:nowrap}
th{color:var(--mut);font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.state{font-weight:600;padding:1px 6px;border-radius:10px;color:#fff;font-size:12px}
.s-up{background:var(--up)}.s-suspended{background:var(--sus)}.s-down{background:var(--down)}
.s-draining{background:var(--drain)}button{font:inherit;font-size:12px;padding:3px 8px;margin:1px;
border-radius:6px;border:1px solid #aab;background:#fff;cursor:pointer}button:hover{background:#eef}
button.danger{border-color:#d99;color:#a11}#auth{display:flex;flex-wrap:wrap;gap:6px;align-items:center}
#auth input{font:inherit;padding:3px 6px;border-radius:6px;border:1px solid #889;min-width:12em}
#msg{min-height:1.4em;margin:6px 0;color:var(--mut)}#msg.err{color:var(--down)}
svg{width:100%;height:160px;background:#fbfcfd;border:1px solid var(--line);border-radius:6px}
.legend span{display:inline-block;margin-right:12px;font-size:12px}.legend i{display:inline-block;width:10px;
height:10px;border-radius:2px;margin-right:4px}.pager{margin-top:6px}
@media (max-width:600px){main{padding:6px}.card{min-width:90px}.card b{font-size:16px}th,td{padding:4px}}
"""

JS = r"""
(function(){
"use strict";
var COLORS=["#2563eb","#dc2626","#16a34a","#9333ea","#ea580c","#0891b2","#ca8a04","#db2777"];
var page=1, perPage=25, busy=false;
function $(id){return document.getElementById(id);}
function token(){try{return sessionStorage.getItem("pbtoken")||"";}catch(e){return "";}}
function headers(){var h={"Accept":"application/json"};var t=token();if(t){h["Authorization"]="Bearer "+t;}return h;}
function el(tag,attrs,text){var e=document.createElement(tag);if(attrs){for(var k in attrs){e.setAttribute(k,attrs[k]);}}
 if(text!==undefined&&text!==null){e.textContent=String(text);}return e;}
function say(text,err){var m=$("msg");m.textContent=text;m.className=err?"err":"";}
function bytes(n){var u=["B","KB","MB","GB","TB"],i=0;while(n>=1024&&i<u.length-1){n/=1024;i++;}return (i?n.toFixed(1):n)+" "+u[i];}
function dur(s){s=Math.floor(s);var d=Math.floor(s/86400),h=Math.floor(s%86400/3600),m=Math.floor(s%3600/60);
 return (d?d+"d ":"")+(d||h?h+"h ":"")+m+"m "+(s%60)+"s";}
function get(url){return fetch(url,{headers:headers(),cache:"no-store"}).then(function(r){
 return r.json().then(function(b){if(!r.ok){throw new Error(b.error||("HTTP "+r.status));}return b;});});}
function act(url,label){
 if(!token()){say("Type the admin token first (actions need it).",true);$("token").focus();return;}
 say(label+" …");
 fetch(url,{method:"POST",headers:headers(),cache:"no-store"}).then(function(r){
  return r.json().then(function(b){if(!r.ok){throw new Error(b.error||("HTTP "+r.status));}return b;});
 }).then(function(){say(label+": done");refresh();}).catch(function(e){say(label+": "+e.message,true);});}
function card(label,value,id){var c=el("div",{"class":"card"});var b=el("b",id?{id:id}:null,value);c.appendChild(b);
 c.appendChild(el("span",null,label));return c;}
function renderTotals(s){var t=s.totals,box=$("cards");box.textContent="";
 box.appendChild(card("sessions now",t.sessions,"sessions-count"));
 box.appendChild(card("sessions total",t.sessions_total,"sessions-total"));
 box.appendChild(card("in standby",t.standby,"standby-count"));
 box.appendChild(card("failed / refused",t.sessions_failed+" / "+t.sessions_refused));
 box.appendChild(card("connect failures",t.connect_failures));
 box.appendChild(card("bytes in / out",bytes(t.bytes_in)+" / "+bytes(t.bytes_out)));
 box.appendChild(card("resumes / drops",t.resumes+" / "+t.drops));
 box.appendChild(card("TLS handshake failures",t.handshake_failures));
 $("version").textContent="v"+s.version;$("uptime").textContent="up "+dur(s.uptime_seconds);}
function metric(m,key,fmt){if(!m){return "–";}var v=m[key];return fmt?fmt(v):v;}
function renderChart(svg,legend,pool){
 var samples=pool.history.samples.slice(), ids=pool.servers.map(function(s){return s.id;});
 samples.push({t:Date.now()/1000,connections:pool.servers.reduce(function(o,s){o[s.id]=s.connections;return o;},{})});
 svg.textContent="";legend.textContent="";
 var W=600,H=160,P=22,max=1;samples.forEach(function(x){ids.forEach(function(id){max=Math.max(max,x.connections[id]||0);});});
 var t0=samples[0].t,t1=samples[samples.length-1].t,span=Math.max(1,t1-t0);
 var NS="http://www.w3.org/2000/svg";svg.setAttribute("viewBox","0 0 "+W+" "+H);svg.setAttribute("preserveAspectRatio","none");
 legend.appendChild(el("span",{"class":"scale"},"max "+max+" · last "+dur(span)));  // text outside the stretched svg
 ids.forEach(function(id,i){var pts=samples.map(function(x){var X=P+(W-2*P)*(x.t-t0)/span,
  Y=H-P-(H-2*P)*(x.connections[id]||0)/max;return X.toFixed(1)+","+Y.toFixed(1);}).join(" ");
  var line=document.createElementNS(NS,"polyline");line.setAttribute("points",pts);line.setAttribute("fill","none");
  line.setAttribute("stroke",COLORS[i%COLORS.length]);line.setAttribute("stroke-width",2);
  line.setAttribute("vector-effect","non-scaling-stroke");line.setAttribute("data-server",id);svg.appendChild(line);
  var key=el("span",null,null);var sw=el("i");sw.style.background=COLORS[i%COLORS.length];key.appendChild(sw);
  key.appendChild(document.createTextNode(id));legend.appendChild(key);});}
var poolShape="";
function serverCells(tr,sv){var m=sv.metrics,st=tr.querySelector(".state");tr.setAttribute("title",sv.reason||"");
 st.textContent=sv.state;st.className="state s-"+sv.state;
 [["address",sv.address],["connections",sv.connections],["standby",sv.standby],["total",sv.total],
  ["failures",sv.connect_failures],["memory",metric(m,"memory_bytes",bytes)],["users",metric(m,"users")],
  ["threads",metric(m,"threads")],["cpu",metric(m,"cpu_percent",function(v){return v.toFixed(1);})],
  ["age",metric(m,"age_seconds",function(v){return v.toFixed(1)+"s";})]].forEach(function(x){
  tr.querySelector("."+x[0]).textContent=String(x[1]);});}
function buildPools(s){var box=$("pools");box.textContent="";
 s.pools.forEach(function(pool,p){var sec=el("section",{"class":"pool","data-pool":p});
  sec.appendChild(el("h2",null,"Pool "+pool.name+" ("+pool.listen+")"));sec.appendChild(el("div",{"class":"sub pool-sub"}));
  sec.appendChild(el("div",{"class":"sub pool-deps"}));sec.appendChild(el("div",{"class":"sub pool-wake"}));
  sec.appendChild(el("div",{"class":"sub pool-scaler"}));
  var wrap=el("div",{"class":"scroll"}),tab=el("table",{id:"servers"}),hr=el("tr");
  ["Server","Address","State","Connections","Standby","Total","Failures","Memory","Users","Threads","CPU %","Age","Actions"]
   .forEach(function(h){hr.appendChild(el("th",null,h));});var th=el("thead");th.appendChild(hr);tab.appendChild(th);
  var tb=el("tbody");pool.servers.forEach(function(sv){var tr=el("tr",{"data-server":sv.id});
   tr.appendChild(el("td",null,sv.id));tr.appendChild(el("td",{"class":"address"}));
   var st=el("td");st.appendChild(el("span",{"class":"state"}));tr.appendChild(st);
   ["connections","standby","total","failures","memory","users","threads","cpu","age"].forEach(function(c){
    tr.appendChild(el("td",{"class":"n "+c}));});
   var a=el("td");[["drain","Drain",""],["ready","Ready",""],["down","Down","danger"]].forEach(function(x){
    var b=el("button",{"data-action":x[0],"data-server":sv.id,"class":x[2]},x[1]);
    b.addEventListener("click",function(){act("/api/v1/servers/"+encodeURIComponent(sv.id)+"/"+x[0]+
     (pool.section?"?pool="+encodeURIComponent(pool.section):""),x[1]+" "+sv.id);});
    a.appendChild(b);});tr.appendChild(a);tb.appendChild(tr);});
  tab.appendChild(tb);wrap.appendChild(tab);sec.appendChild(wrap);
  if(pool.nodes){sec.appendChild(el("div",{"class":"nodes"}));}
  if(pool.farm){sec.appendChild(el("div",{"class":"sub farm"}));}
  sec.appendChild(el("div",{"class":"sub"},"Connections per server"));
  var svg=document.createElementNS("http://www.w3.org/2000/svg","svg");svg.setAttribute("id","chart");sec.appendChild(svg);
  sec.appendChild(el("div",{"class":"legend"}));
  if(pool.forecast){sec.appendChild(el("div",{"class":"sub"},"Warm-up today (00:00-24:00, 15-minute slots): forecast vs actual"));
   var fs=document.createElementNS("http://www.w3.org/2000/svg","svg");fs.setAttribute("class","forecast");sec.appendChild(fs);
   sec.appendChild(el("div",{"class":"legend forecast-legend"}));}
  box.appendChild(sec);});}
// The table is built once per set of pools and servers and then updated in place, so a button
// under the pointer is never replaced between a press and its release.
function renderPools(s){var shape=JSON.stringify(s.pools.map(function(p){return [p.name,p.listen,
  p.servers.map(function(v){return v.id;}),!!p.forecast];}));
 if(shape!==poolShape){buildPools(s);poolShape=shape;}
 s.pools.forEach(function(pool,p){var sec=document.querySelector('section[data-pool="'+p+'"]');
  sec.querySelector(".pool-sub").textContent="SORT_METHOD "+pool.sort_method+(pool.sort_method!==pool.sort_method_configured?
   " (configured "+pool.sort_method_configured+")":"")+" · MONITORING_TYPE "+pool.monitoring_type+" · "+pool.sessions+
   " sessions"+(pool.max_sessions?" of "+pool.max_sessions:"");
  renderDeps(sec.querySelector(".pool-deps"),pool.dependencies||[]);renderWake(sec.querySelector(".pool-wake"),pool.scale_to_zero);
  renderScaler(sec.querySelector(".pool-scaler"),pool.scaler);
  pool.servers.forEach(function(sv){serverCells(sec.querySelector('tr[data-server="'+CSS.escape(sv.id)+'"]'),sv);});
  if(pool.nodes){renderNodes(sec.querySelector(".nodes"),pool);}
  if(pool.farm&&sec.querySelector(".farm")){renderFarm(sec.querySelector(".farm"),pool.farm);}
  renderChart(sec.querySelector("svg"),sec.querySelector(".legend"),pool);
  if(pool.forecast){renderForecast(sec.querySelector("svg.forecast"),sec.querySelector(".forecast-legend"),pool.forecast);}});}
// Warm-up: forecast nodes per slot (dashed step line) against nodes running (bars) and sessions per
// SESSIONS_PER_NODE (line) recorded so far today; the red line is now.
function renderForecast(svg,legend,f){var NS="http://www.w3.org/2000/svg",W=600,H=160,P=22,n=f.slots.length,spn=f.sessions_per_node;
 svg.textContent="";legend.textContent="";svg.setAttribute("viewBox","0 0 "+W+" "+H);svg.setAttribute("preserveAspectRatio","none");
 var max=1;f.slots.forEach(function(x){max=Math.max(max,x.forecast_nodes,x.nodes||0,(x.sessions||0)/spn);});
 var bw=(W-2*P)/n;function X(i){return P+bw*i;}function Y(v){return H-P-(H-2*P)*v/max;}
 function add(tag,attrs){var e=document.createElementNS(NS,tag);for(var k in attrs){e.setAttribute(k,attrs[k]);}svg.appendChild(e);return e;}
 f.slots.forEach(function(x,i){if(x.nodes){add("rect",{x:X(i).toFixed(1),y:Y(x.nodes).toFixed(1),width:(bw*0.9).toFixed(1),
  height:(H-P-Y(x.nodes)).toFixed(1),fill:"#cbd5e1","data-slot":i});}});
 var fc=[],ac=[];f.slots.forEach(function(x,i){var y=Y(x.forecast_nodes).toFixed(1);fc.push(X(i).toFixed(1)+","+y,X(i+1).toFixed(1)+","+y);
  if(x.sessions!==null){ac.push((X(i)+bw/2).toFixed(1)+","+Y(x.sessions/spn).toFixed(1));}});
 add("polyline",{points:fc.join(" "),fill:"none",stroke:"#2563eb","stroke-width":2,"stroke-dasharray":"4 3",
  "vector-effect":"non-scaling-stroke","data-series":"forecast"});
 if(ac.length){add("polyline",{points:ac.join(" "),fill:"none",stroke:"#16a34a","stroke-width":2,
  "vector-effect":"non-scaling-stroke","data-series":"sessions"});}
 var nx=(X(f.current_slot)+bw/2).toFixed(1);add("line",{x1:nx,x2:nx,y1:P,y2:H-P,stroke:"#c62828","stroke-width":1,"vector-effect":"non-scaling-stroke"});
 [["#2563eb","forecast nodes"],["#cbd5e1","nodes running"],["#16a34a","sessions / "+spn]].forEach(function(k){
  var key=el("span",null,null),sw=el("i");sw.style.background=k[0];key.appendChild(sw);key.appendChild(document.createTextNode(k[1]));legend.appendChild(key);});
 legend.appendChild(el("span",{"class":"forecast-meta"},"max "+Math.ceil(max)+" · "+f.weekday+" "+f.date+(f.holiday?" (holiday: forecast 0)":"")+
  " · floor now "+f.floor+" · lead "+f.lead_seconds+" s (cold start "+f.cold_start_seconds+" s)"+
  (f.forecast_only?" · FORECAST_ONLY: logged, not applied":"")));}
// Managed nodes: rebuilt only when a node comes, goes or changes state; persistent ones in bold.
function renderNodes(box,pool){var n=pool.nodes,q=pool.section?"?pool="+encodeURIComponent(pool.section):"";
 var shape=JSON.stringify(n.nodes.map(function(x){return [x.id,x.state];}));
 if(box.getAttribute("data-shape")!==shape){box.setAttribute("data-shape",shape);box.textContent="";
  var head=el("div",{"class":"sub"},"Nodes ("+n.transport+", "+n.min_nodes+".."+n.max_nodes+")"+
   (n.crash_streak>1?" · crash loop: "+n.crash_streak+" failures in a row":"")+
   (n.persistent_refused?" · no persistent node: "+n.persistent_refused:""));
  var sc=el("button",{"data-action":"scale"},"Scale");sc.addEventListener("click",function(){
   var v=window.prompt("MIN_NODES (0.."+n.max_nodes+")",String(n.min_nodes));if(v!==null){
    act("/api/v1/nodes/scale?min="+encodeURIComponent(v)+(q?"&"+q.slice(1):""),"Scale nodes");}});
  head.appendChild(sc);box.appendChild(head);
  var tab=el("table",{"class":"nodes"}),hr=el("tr");
  ["Node","PID","Endpoint","State","Sessions","Total","Age","Memory","Actions"].forEach(function(h){
   hr.appendChild(el("th",null,h));});tab.appendChild(hr);
  n.nodes.forEach(function(x){var tr=el("tr",{"data-node":x.id,"title":x.reason||""});
   var id=el("td",null,String(x.id));if(x.persistent){id.style.fontWeight="bold";}tr.appendChild(id);
   tr.appendChild(el("td",null,String(x.pid||"–")));tr.appendChild(el("td",null,x.endpoint));
   var st=el("td");st.appendChild(el("span",{"class":"state s-"+({active:"up",suspended:"suspended",
    discarded:"draining",purged:"down",starting:"suspended"})[x.state]},x.state));tr.appendChild(st);
   ["sessions","total","age","memory"].forEach(function(c){tr.appendChild(el("td",{"class":"n "+c}));});
   var a=el("td");[["recycle","Recycle",""],["discard","Discard","danger"]].forEach(function(y){
    var b=el("button",{"data-action":y[0],"data-node":x.id,"class":y[2]},y[1]);
    b.addEventListener("click",function(){act("/api/v1/nodes/"+x.id+"/"+y[0]+q,y[1]+" node "+x.id);});
    a.appendChild(b);});tr.appendChild(a);tab.appendChild(tr);});
  box.appendChild(tab);}
 n.nodes.forEach(function(x){var tr=box.querySelector('tr[data-node="'+x.id+'"]');if(!tr){return;}
  tr.querySelector(".sessions").textContent=String(x.sessions);tr.querySelector(".total").textContent=String(x.total_sessions);
  tr.querySelector(".age").textContent=x.age_seconds===null?"–":dur(x.age_seconds);
  tr.querySelector(".memory").textContent=x.memory_bytes===null?"–":bytes(x.memory_bytes);});}
// FARM_HOSTS: a line per farm host: its agent's link up or down, since when, the last problem, our nodes on it.
function renderFarm(box,farm){box.textContent="";farm.forEach(function(h){var line=el("div",{"data-farm-host":h.host});
 line.appendChild(document.createTextNode("farm host "+h.host+" "));
 line.appendChild(el("span",{"class":"state s-"+(h.state==="up"?"up":"down")},h.state));
 line.appendChild(document.createTextNode(" since "+new Date(h.since*1000).toLocaleTimeString()+" ("+dur(h.for_seconds)+") · "+
  h.nodes.length+" node"+(h.nodes.length===1?"":"s")+(h.nodes.length?" ("+h.nodes.join(", ")+")":"")+
  (h.problem?" · last problem: "+h.problem:"")));box.appendChild(line);});}
// SCALE_TO_ZERO: "waking" with the held sessions, asleep, or the countdown to sleep.
function renderWake(box,z){box.textContent="";if(!z){return;}
 var st=z.waking?"waking":(z.ready>0?"awake":"asleep");
 box.appendChild(document.createTextNode("scale to zero: "));
 var w=z.waiting_for&&z.waiting_for.length?"waiting for dependencies: "+z.waiting_for.join(", "):st;
 box.appendChild(el("span",{"class":"state s-"+(w!==st?"suspended":({waking:"suspended",awake:"up",asleep:"draining"})[st]),"data-wake":st},w));
 box.appendChild(document.createTextNode(" · "+z.held+" held (max "+z.max_held+") · "+z.ready+" ready of "+
  (z.target===null?"?":z.target)+(z.waking?" · waking for "+dur(z.waking_for):"")+
  (z.sleeps_in!==null&&!z.waking&&z.held===0&&z.ready>0?" · sleeps in "+dur(z.sleeps_in):"")+
  " · "+z.wakes+" wakes"+(z.last_wake_seconds!==null?" (last "+z.last_wake_seconds.toFixed(2)+" s)":"")+
  (z.refused_full+z.refused_timeout?" · refused "+z.refused_full+" over MAX_HELD, "+z.refused_timeout+" past WAKE_TIMEOUT":"")));}
// KUBERNETES: the workload, replicas asked for and ready, the EndpointSlice watch and its troubles.
function renderScaler(box,k){box.textContent="";if(!k){return;}var c=k.counts||{};
 box.appendChild(document.createTextNode("Kubernetes "+k.workload+" in "+k.namespace+" (service "+k.service+"): "));
 box.appendChild(el("span",{"class":"state s-"+(k.ready>0?"up":(k.desired>0?"suspended":"draining")),"data-kube":"replicas"},
  k.ready+" ready of "+k.desired));
 box.appendChild(document.createTextNode((k.pending_scale?" · scaling":"")+" · "+k.endpointslices+" watch"+
  (k.resource_version?" at "+k.resource_version:"")+" · "+Math.max(0,(c.watches||0)-1)+" watch restarts · "+
  (c.gone||0)+" × 410 · "+(c.errors||0)+" errors"));}
// DEPENDS_ON: each dependency's state; one that is down says since when and why (no new session meanwhile).
function renderDeps(box,deps){box.textContent="";if(!deps.length){return;}box.appendChild(document.createTextNode("depends on "));
 deps.forEach(function(d){var st=el("span",{"class":"state s-"+(d.state==="unchecked"?"suspended":d.state),"data-dependency":d.name,
  "title":d.where+": "+d.reason},d.name+" "+d.state);box.appendChild(st);
  if(d.state!=="up"){box.appendChild(document.createTextNode(" since "+new Date(d.since*1000).toLocaleTimeString()+" ("+d.reason+
   (d.refused?", "+d.refused+" refused":"")+") "));}else{box.appendChild(document.createTextNode(" "));}});}
function renderSessions(d){var tb=$("sessions-body"),old={},rows=[];
 Array.prototype.forEach.call(tb.children,function(tr){old[tr.getAttribute("data-session")]=tr;});
 d.sessions.forEach(function(x){var tr=old[String(x.id)];  // kept rows keep their Close button
  if(!tr){tr=el("tr",{"data-session":x.id});for(var i=0;i<8;i++){tr.appendChild(el("td",i>4?{"class":"n"}:null));}
   var a=el("td"),b=el("button",{"class":"danger","data-action":"close","data-session":x.id},"Close");
   b.addEventListener("click",function(){act("/api/v1/sessions/"+x.id+"/close","Close session "+x.id);});
   a.appendChild(b);tr.appendChild(a);}
  [x.id,x.client,x.server||"–",x.state,new Date(x.started_at*1000).toLocaleTimeString(),dur(x.duration_seconds),
   bytes(x.bytes_in),bytes(x.bytes_out)].forEach(function(v,i){tr.children[i].textContent=String(v);});
  rows.push(tr);});
 rows.forEach(function(tr,i){if(tb.children[i]!==tr){tb.insertBefore(tr,tb.children[i]||null);}});
 while(tb.children.length>rows.length){tb.removeChild(tb.lastChild);}
 $("page-info").textContent="page "+d.page+" of "+d.pages+" · "+d.total+" sessions";
 $("standby-info").textContent=d.standby.length?d.standby.length+" in standby: "+d.standby.map(function(x){
  return "#"+x.session_id+" "+x.client+" → "+x.server_id;}).join(", "):"";
 if(page>d.pages){page=d.pages;}}
function refresh(){if(busy){return;}busy=true;
 Promise.all([get("/api/v1/status"),get("/api/v1/sessions?page="+page+"&per_page="+perPage)]).then(function(r){
  renderTotals(r[0]);renderPools(r[0]);renderSessions(r[1]);$("updated").textContent="updated "+new Date().toLocaleTimeString();
  $("actions-off").hidden=!!r[0].admin.actions;
 }).catch(function(e){say("refresh failed: "+e.message,true);}).then(function(){busy=false;});}
$("use").addEventListener("click",function(){try{sessionStorage.setItem("pbtoken",$("token").value.trim());}catch(e){}
 $("token").value="";say("token kept for this tab");refresh();});
$("forget").addEventListener("click",function(){try{sessionStorage.removeItem("pbtoken");}catch(e){}say("token forgotten");});
$("reload").addEventListener("click",function(){act("/api/v1/reload","Reload config");});
$("prev").addEventListener("click",function(){if(page>1){page--;refresh();}});
$("next").addEventListener("click",function(){page++;refresh();});
refresh();setInterval(refresh,2000);
})();
"""

BODY = """<header><h1>protheus-broker</h1><span class="meta" id="version"></span><span class="meta" id="uptime"></span>
<span class="meta" id="updated"></span></header>
<main>
<div id="auth"><input id="token" type="password" autocomplete="off" placeholder="admin token (for actions)">
<button id="use">Use token</button><button id="forget">Forget</button><button id="reload">Reload config</button>
<span id="actions-off" hidden>actions disabled: no TOKEN_HASH configured</span></div>
<div id="msg"></div>
<div class="cards" id="cards"></div>
<div id="pools"></div>
<section><h2>Sessions</h2><div class="scroll"><table id="sessions"><thead><tr><th>#</th><th>Client</th><th>Server</th>
<th>State</th><th>Started</th><th>Duration</th><th>In</th><th>Out</th><th></th></tr></thead>
<tbody id="sessions-body"></tbody></table></div>
<div class="pager"><button id="prev">&lsaquo; Prev</button><button id="next">Next &rsaquo;</button>
<span id="page-info"></span></div><div class="sub" id="standby-info"></div></section>
</main>"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE_HTML = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    "<link rel=\"icon\" href=\"data:,\"><title>protheus-broker</title><style>" + CSS + "</style></head><body>" + BODY
    + "<script>" + JS + "</script></body></html>\n"
).encode()

#: Only these inline blocks run; the page talks only to its own origin.
PAGE_CSP = (
    f"default-src 'none'; script-src {_sha256(JS)}; style-src {_sha256(CSS)}; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
).encode()
